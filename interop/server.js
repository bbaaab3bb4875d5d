#!/usr/bin/env node
// A local StandCloud: a real OAuth 2.0 / OpenID Connect authorization server
// (the npm package oidc-provider, version pinned in package-lock.json) laid
// out like StandCloud's Authelia, plus the two StandCloud API routes that
// standcloud-auth talks to. For the interop tests and for trying the tool
// without a StandCloud account. Not for production: keys, sessions and tokens
// live in memory and vanish when it stops; any login and password sign in.
//
//   npm ci --prefix interop
//   node interop/server.js --port 8765        (0, the default, picks a free port)
//
// The first stdout line is `READY <base URL>`; then the server runs until it
// gets SIGINT or SIGTERM. Everything else goes to stderr. Settings, from the
// environment (seconds):
//
//   ACCESS_TOKEN_TTL   3600  access-token lifetime (expires_in)
//   REFRESH_TOKEN_TTL  5400  refresh-token lifetime, restarted by every refresh
//                            (Authelia's default: 90 minutes)
//   DEVICE_CODE_TTL    600   device and user code lifetime
//   POLL_INTERVAL      5     `interval` in the device authorization response
//   SLOW_DOWN          1     1: a poll less than `interval` after the previous
//                            poll of the same code gets `slow_down`, and the
//                            timer restarts on it (Authelia's rule); 0: off
//   ACCESS_DENIED_STATUS 400 HTTP status of `access_denied` at the token
//                            endpoint (Authelia sends 403)
//   REVOKE_ACCESS_ON_REFRESH 1  1: a refresh revokes the grant's older access
//                            tokens at once (Authelia does); 0: they live on
//   DENY_AS_SERVER_ERROR 0   1: a poll of a denied, redeemed or unknown device
//                            code gets 500 server_error "... Misconfigured
//                            code ...", on that poll and every later one, as
//                            the running Authelia 4.39.20 answers; 0: what
//                            oidc-provider does (access_denied once, then
//                            invalid_grant; a redeemed code polled again gets
//                            invalid_grant and its tokens revoked)
//   EMPTY_DEVICE_AUTH_ERRORS 0  1: a refused device authorization (unknown
//                            client, empty form, audience not allowed)
//                            answers the same HTTP status with the body {}
//                            and no `error` field, as the running Authelia
//                            4.39.20; 0: oidc-provider's OAuth error body
//   INTEROP_STATS      0     1: GET /__stats answers counters as JSON
//   INTEROP_LOG        0     1: one stderr line per request

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

// oidc-provider 9 needs URL.parse: Node.js 20.18 or newer (it recommends 22 LTS
// and warns on 20). Check before loading it, for a clear message.
{
  const [major, minor] = process.versions.node.split('.').map(Number);
  if (major < 20 || (major === 20 && minor < 18)) {
    process.stderr.write(`server.js: error: Node.js ${process.versions.node} is too old; `
      + 'install Node.js 20.18 or newer (22 LTS recommended)\n');
    process.exit(1);
  }
}
const { default: Provider, errors } = await import('oidc-provider');
// Internal, but the version is pinned: the table of grant handlers, used to
// put Authelia's slow_down rule in front of the device-code grant.
const { default: instance } = await import('oidc-provider/lib/helpers/weak_cache.js');

// ==== settings ===============================================================

const CLIENT_ID = 'hardpy-report-uploader';
const BEARER_SCOPE = 'authelia.bearer.authz';
const ISSUER_PATH = '/auth'; // StandCloud serves Authelia under /auth
const API_PATH = '/hardpy/api/v1';
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
// What Authelia 4.39.20 answers a poll of a denied, redeemed or unknown
// device code (its library's server_error text and "Misconfigured code" hint).
const MISCONFIGURED = 'The authorization server encountered an unexpected condition that prevented it '
  + 'from fulfilling the request. Misconfigured code lead to an error that prohibited the OAuth 2.0 '
  + 'Framework from processing this request.';

function envInt(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a whole number of seconds, not ${JSON.stringify(raw)}`);
  }
  return value;
}

const settings = {
  accessTokenTTL: envInt('ACCESS_TOKEN_TTL', 3600),
  refreshTokenTTL: envInt('REFRESH_TOKEN_TTL', 5400),
  deviceCodeTTL: envInt('DEVICE_CODE_TTL', 600),
  pollInterval: envInt('POLL_INTERVAL', 5),
  slowDown: envInt('SLOW_DOWN', 1) === 1,
  accessDeniedStatus: envInt('ACCESS_DENIED_STATUS', 400),
  revokeAccessOnRefresh: envInt('REVOKE_ACCESS_ON_REFRESH', 1) === 1,
  denyAsServerError: envInt('DENY_AS_SERVER_ERROR', 0) === 1,
  emptyDeviceAuthErrors: envInt('EMPTY_DEVICE_AUTH_ERRORS', 0) === 1,
  stats: envInt('INTEROP_STATS', 0) === 1,
  log: envInt('INTEROP_LOG', 0) === 1,
};

// For --help: name, default, what it does.
const SETTINGS_HELP = [
  ['ACCESS_TOKEN_TTL', 3600, 'access-token lifetime'],
  ['REFRESH_TOKEN_TTL', 5400, 'refresh-token lifetime, restarted by every refresh'],
  ['DEVICE_CODE_TTL', 600, 'device and user code lifetime'],
  ['POLL_INTERVAL', 5, '`interval` of the device authorization response'],
  ['SLOW_DOWN', 1, '1: an early poll gets slow_down and restarts the timer (Authelia\'s library)'],
  ['ACCESS_DENIED_STATUS', 400, 'HTTP status of access_denied (Authelia\'s library: 403)'],
  ['REVOKE_ACCESS_ON_REFRESH', 1, '1: a refresh revokes the older access tokens (Authelia)'],
  ['DENY_AS_SERVER_ERROR', 0, '1: a denied, redeemed or unknown device code gets 500 server_error'
    + ' on every poll (the running Authelia 4.39.20)'],
  ['EMPTY_DEVICE_AUTH_ERRORS', 0, '1: a refused device authorization answers its status with the'
    + ' body {} (the running Authelia 4.39.20)'],
  ['INTEROP_STATS', 0, '1: GET /__stats answers counters as JSON'],
  ['INTEROP_LOG', 0, '1: one stderr line per request'],
  ['PORT', 0, 'the port when --port is not given (0: a free one)'],
];

function parseArgs(argv) {
  const out = { host: '127.0.0.1', port: envInt('PORT', 0) };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    const [flag, inline] = arg.includes('=') ? arg.split(/=(.*)/s, 2) : [arg, undefined];
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--port') out.port = Number(value());
    else if (flag === '--host') out.host = value();
    else if (flag === '-h' || flag === '--help') {
      process.stdout.write('usage: [VARIABLE=value ...] node interop/server.js [--port N] [--host 127.0.0.1]\n'
        + 'A local StandCloud for standcloud-auth; see interop/README.md.\n\n'
        + 'Settings (environment variables; times in seconds):\n'
        + SETTINGS_HELP.map(([name, fallback, what]) => `  ${name.padEnd(25)} ${String(fallback).padEnd(4)} ${what}\n`).join(''));
      process.exit(0);
    } else {
      process.stderr.write(`server.js: error: unknown argument ${arg}\n`);
      process.exit(2);
    }
  }
  if (!Number.isInteger(out.port) || out.port < 0 || out.port > 65535) {
    process.stderr.write('server.js: error: --port takes 0..65535\n');
    process.exit(2);
  }
  return out;
}

const stats = {
  device_authorization: 0,
  device_authorization_refused: 0,
  device_code_polls: 0,
  device_code_tokens: 0,
  device_code_server_error: 0, // polls answered 500 server_error (DENY_AS_SERVER_ERROR=1)
  slow_down: 0,
  refresh: 0, // successful refresh grants
  refresh_rejected: 0,
  revocation: 0,
  api_ok: 0,
  api_unauthorized: 0,
};

// ==== HTML pages (plain forms: a person in a browser, or approve.py) =========

function esc(value) {
  return String(value).replace(/[&<>"']/g, (c) => ({
    '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
  }[c]));
}

// `step` is machine-readable for approve.py: code, confirm, login, consent,
// done, denied, error.
function page(step, title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="standcloud-step" content="${esc(step)}">
<title>${esc(title)} - local StandCloud</title>
<style>
body{font-family:system-ui,sans-serif;max-width:28em;margin:3em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}code.user-code{font-size:1.6em;letter-spacing:.1em}
input[type=text],input[type=password]{display:block;width:100%;box-sizing:border-box;font-size:1.1em;padding:.4em;margin:.3em 0 1em}
button{font-size:1em;padding:.5em 1.2em;margin-right:.5em}.error{color:#b00020}.note{color:#666;font-size:.9em}
</style>
</head>
<body>
<h1>${esc(title)}</h1>
${body}
<p class="note">Local StandCloud for trying standcloud-auth (oidc-provider). Any login signs in.</p>
</body>
</html>`;
}

function insertBeforeFormEnd(form, html) {
  const at = form.lastIndexOf('</form>');
  return `${form.slice(0, at)}${html}\n${form.slice(at)}`;
}

async function userCodeInputSource(ctx, form, out, err) {
  let step = 'code';
  let message = '<p>Enter the code shown on the station.</p>';
  if (err && err.name === 'AbortedError') {
    step = 'denied';
    message = '<p class="error">Access was denied. The station has not been signed in.</p>';
  } else if (err && err.name === 'ExpiredError') {
    step = 'error';
    message = '<p class="error">That code has expired. Start the login on the station again.</p>';
  } else if (err && (err.userCode || err.name === 'NoCodeError')) {
    step = 'error';
    message = `<p class="error">The code is not valid${err.name === 'AlreadyUsedError' ? ' any more (it was already used)' : ''}. Try again.</p>`;
  } else if (err) {
    step = 'error';
    message = `<p class="error">${esc((out && out.error_description) || 'There was an error processing your request')}</p>`;
  }
  const filled = insertBeforeFormEnd(form, '<button type="submit">Continue</button>')
    .replace('name="user_code"', 'name="user_code" aria-label="Code"');
  ctx.type = 'html';
  ctx.body = page(step, 'Connect a station', `${message}\n${filled}`);
}

async function userCodeConfirmSource(ctx, form, client, deviceInfo, userCode) {
  const buttons = '<button type="submit">Continue</button>'
    + '<button type="submit" name="abort" value="yes">Deny</button>';
  ctx.type = 'html';
  ctx.body = page('confirm', 'Confirm the code', `
<p><strong>${esc(client.clientName || client.clientId)}</strong> wants to connect.
Check that the station shows this code:</p>
<p><code class="user-code">${esc(userCode.length === 8 ? `${userCode.slice(0, 4)}-${userCode.slice(4)}` : userCode)}</code></p>
${insertBeforeFormEnd(form, buttons)}`);
}

async function successSource(ctx) {
  ctx.type = 'html';
  ctx.body = page('done', 'Station connected', '<p>The station is signed in. You can close this page.</p>');
}

// ==== the provider ===========================================================

function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };
}

function buildProvider(base) {
  const apiUrl = `${base}${API_PATH}`;
  const configuration = {
    clients: [{
      client_id: CLIENT_ID,
      client_name: 'HardPy report uploader',
      token_endpoint_auth_method: 'none',
      grant_types: [DEVICE_GRANT, 'refresh_token'],
      response_types: [],
      redirect_uris: [],
    }],
    // `audience` is the form field StandCloud's clients send; it names the API.
    extraParams: ['audience'],
    scopes: ['openid', 'offline_access'],
    routes: {
      device_authorization: '/api/oidc/device-authorization',
      token: '/api/oidc/token',
      revocation: '/api/oidc/revocation',
      introspection: '/api/oidc/introspection',
      jwks: '/jwks.json',
      code_verification: '/consent/openid/device-authorization',
      userinfo: '/api/oidc/userinfo',
    },
    ttl: {
      AccessToken: settings.accessTokenTTL,
      RefreshToken: settings.refreshTokenTTL,
      DeviceCode: settings.deviceCodeTTL,
      Grant: 14 * 24 * 3600,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
    },
    rotateRefreshToken: true,
    // Any login is an account; tokens carry only `sub`.
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    // Fresh signing keys on every start (nothing here signs a token the
    // client reads, but the provider wants a key set).
    jwks: { keys: [signingKey()] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    interactions: { url: (ctx, interaction) => `${ISSUER_PATH}/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      deviceFlow: {
        enabled: true,
        charset: 'base-20', // BCDFGHJKLMNPQRSTVWXZ, as Authelia
        mask: '********', // eight characters, no hyphen, as Authelia
        userCodeInputSource,
        userCodeConfirmSource,
        successSource,
      },
      revocation: { enabled: true },
      introspection: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // RFC 8707 calls it `resource`; Authelia and HardPy call it `audience`.
        defaultResource: async (ctx, client, oneOf) => {
          if (oneOf) return oneOf;
          return ctx.oidc.params.audience || apiUrl;
        },
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          if (resourceIndicator !== apiUrl) {
            throw new errors.InvalidTarget(`the only audience here is ${apiUrl}`);
          }
          return {
            scope: BEARER_SCOPE,
            audience: apiUrl,
            accessTokenTTL: settings.accessTokenTTL,
            accessTokenFormat: 'opaque',
          };
        },
      },
    },
  };
  const provider = new Provider(`${base}${ISSUER_PATH}`, configuration);
  provider.on('server_error', (ctx, err) => process.stderr.write(`server.js: server_error: ${err.stack}\n`));
  installAutheliaRules(provider);
  return provider;
}

// Authelia's rules that oidc-provider does not have: `interval` in the device
// authorization response, slow_down, 403 for access_denied, a refresh
// revoking the older access tokens of the same login, and (switched on) the
// running server's 500 server_error for a dead device code and {} bodies for
// refused device authorizations.
function installAutheliaRules(provider) {
  const handlers = instance(provider).grantTypeHandlers;
  const deviceHandler = handlers.get(DEVICE_GRANT);
  const lastPoll = new Map(); // device_code -> ms
  handlers.set(DEVICE_GRANT, async (ctx) => {
    stats.device_code_polls += 1;
    const code = ctx.oidc.params.device_code;
    if (settings.denyAsServerError && code) {
      // Authelia: a denied code (`error` set by the Deny), a redeemed one
      // (`consumed`) or an unknown one: 500 on every poll. Answered here,
      // before oidc-provider's handler, which would consume a denied code
      // and revoke the tokens of a redeemed one.
      const found = await provider.DeviceCode.find(String(code), { ignoreExpiration: true });
      if (!found || found.consumed || found.error) {
        stats.device_code_server_error += 1;
        ctx.status = 500;
        ctx.body = { error: 'server_error', error_description: MISCONFIGURED };
        return;
      }
    }
    const now = Date.now();
    const previous = lastPoll.get(code);
    lastPoll.set(code, now); // Authelia restarts the timer on every poll
    if (settings.slowDown && previous !== undefined && now - previous < settings.pollInterval * 1000) {
      stats.slow_down += 1;
      throw new errors.SlowDown(`Too many requests within a short time period. The device made an attempt within [${settings.pollInterval}] seconds.`);
    }
    await deviceHandler(ctx);
    stats.device_code_tokens += 1;
  });

  const accessTokensByGrant = new Map(); // grantId -> Set of jti
  provider.on('access_token.saved', (token) => {
    if (!token.grantId) return;
    if (!accessTokensByGrant.has(token.grantId)) accessTokensByGrant.set(token.grantId, new Set());
    accessTokensByGrant.get(token.grantId).add(token.jti);
  });

  provider.use(async (ctx, next) => {
    await next();
    const route = ctx.oidc && ctx.oidc.route;
    if (route === 'device_authorization' && ctx.status === 200 && ctx.body && ctx.body.device_code) {
      stats.device_authorization += 1;
      ctx.body.interval = settings.pollInterval;
    } else if (route === 'device_authorization' && ctx.status >= 400) {
      stats.device_authorization_refused += 1;
      if (settings.emptyDeviceAuthErrors) {
        // Authelia 4.39.20: the error's HTTP status, the body {}.
        const { status } = ctx;
        ctx.body = {};
        ctx.status = status;
      }
    } else if (route === 'revocation') {
      stats.revocation += 1;
    } else if (route === 'token') {
      const grantType = ctx.oidc.params && ctx.oidc.params.grant_type;
      const error = ctx.body && typeof ctx.body === 'object' ? ctx.body.error : undefined;
      if (grantType === DEVICE_GRANT && error === 'access_denied') {
        ctx.status = settings.accessDeniedStatus;
      }
      if (grantType === 'refresh_token') {
        if (ctx.status === 200) {
          stats.refresh += 1;
          const current = ctx.oidc.entities.AccessToken;
          const grantId = current && current.grantId;
          if (settings.revokeAccessOnRefresh && grantId && accessTokensByGrant.has(grantId)) {
            const ids = accessTokensByGrant.get(grantId);
            await Promise.all([...ids].filter((jti) => jti !== current.jti).map(async (jti) => {
              ids.delete(jti);
              await provider.AccessToken.adapter.destroy(jti);
            }));
          }
        } else {
          stats.refresh_rejected += 1;
        }
      }
    }
  });
}

// ==== sign-in and consent (the person's side, after the code) ================

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return querystring.parse(Buffer.concat(chunks).toString('utf8'));
}

function sendHtml(res, status, html) {
  res.writeHead(status, {
    'Content-Type': 'text/html; charset=utf-8',
    'Cache-Control': 'no-store',
  });
  res.end(html);
}

function consentList(details) {
  const items = [];
  for (const scope of details.missingOIDCScope || []) {
    if (scope === 'offline_access') items.push('<li>stay signed in (offline_access)</li>');
    else items.push(`<li>${esc(scope)}</li>`);
  }
  for (const [resource, scopes] of Object.entries(details.missingResourceScopes || {})) {
    items.push(`<li>call <code>${esc(resource)}</code> as you (${scopes.map(esc).join(', ')})</li>`);
  }
  return items.length ? `<ul>${items.join('')}</ul>` : '<p>Confirm the access granted before.</p>';
}

async function interaction(provider, req, res, uid) {
  let details;
  try {
    details = await provider.interactionDetails(req, res);
  } catch (err) {
    sendHtml(res, 400, page('error', 'Sign-in expired', `<p class="error">${esc(err.message)}</p>
<p>Open the link from the station again.</p>`));
    return;
  }
  if (details.uid !== uid) {
    sendHtml(res, 400, page('error', 'Sign-in expired', '<p class="error">This page belongs to another sign-in.</p>'));
    return;
  }
  const { prompt, params, session } = details;
  const action = `${ISSUER_PATH}/interaction/${esc(uid)}`;

  if (req.method === 'GET') {
    if (prompt.name === 'login') {
      sendHtml(res, 200, page('login', 'Sign in', `
<form method="post" action="${action}" autocomplete="off">
<input type="hidden" name="prompt" value="login">
<label>Login<input type="text" name="login" value="operator" autofocus required></label>
<label>Password (any)<input type="password" name="password"></label>
<button type="submit">Sign in</button>
</form>`));
    } else if (prompt.name === 'consent') {
      const client = await provider.Client.find(params.client_id);
      sendHtml(res, 200, page('consent', 'Allow access?', `
<p>Signed in as <strong>${esc(session.accountId)}</strong>.
<strong>${esc((client && client.clientName) || params.client_id)}</strong> asks to:</p>
${consentList(prompt.details)}
<form method="post" action="${action}">
<input type="hidden" name="prompt" value="consent">
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button>
</form>`));
    } else {
      sendHtml(res, 501, page('error', 'Not supported', `<p class="error">prompt ${esc(prompt.name)}</p>`));
    }
    return;
  }

  const form = await readForm(req);
  if (form.prompt !== prompt.name) {
    sendHtml(res, 400, page('error', 'Out of step', '<p class="error">This form is out of date; go back and reload.</p>'));
    return;
  }
  if (form.decision === 'deny' || form.abort) {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'The resource owner denied the request',
    }, { mergeWithLastSubmission: false });
    return;
  }
  if (prompt.name === 'login') {
    const login = String(form.login || '').trim();
    if (!login) {
      sendHtml(res, 400, page('error', 'Sign in', '<p class="error">Enter a login.</p>'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
    return;
  }
  // consent
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (prompt.details.missingOIDCScope) grant.addOIDCScope(prompt.details.missingOIDCScope.join(' '));
  if (prompt.details.missingOIDCClaims) grant.addOIDCClaims(prompt.details.missingOIDCClaims);
  for (const [resource, scopes] of Object.entries(prompt.details.missingResourceScopes || {})) {
    grant.addResourceScope(resource, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

// ==== the StandCloud API =====================================================

function sendJson(res, status, body, headers = {}) {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': data.length,
    'Cache-Control': 'no-store',
    ...headers,
  });
  res.end(data);
}

// Like Authelia's bearer check: a known, unexpired, unrevoked access token
// issued for this API with the bearer scope; 401 invalid_token otherwise.
async function checkBearer(provider, apiUrl, req) {
  const header = req.headers.authorization || '';
  const match = /^Bearer[ ]+([A-Za-z0-9._~+/-]+=*)$/i.exec(header);
  if (!match) return { error: 'invalid_request', description: 'no bearer token' };
  const token = await provider.AccessToken.find(match[1]);
  if (!token) return { error: 'invalid_token', description: 'the token is unknown, expired or revoked' };
  if (token.isExpired) return { error: 'invalid_token', description: 'the token expired' };
  const audience = [].concat(token.aud || []);
  if (!audience.includes(apiUrl)) return { error: 'invalid_token', description: 'the token is not for this API' };
  if (!String(token.scope || '').split(' ').includes(BEARER_SCOPE)) {
    return { error: 'invalid_token', description: `the token lacks ${BEARER_SCOPE}` };
  }
  return { token };
}

async function api(provider, base, req, res, path) {
  const check = await checkBearer(provider, `${base}${API_PATH}`, req);
  if (check.error) {
    stats.api_unauthorized += 1;
    const challenge = check.error === 'invalid_request'
      ? 'Bearer realm="StandCloud"'
      : `Bearer realm="StandCloud", error="invalid_token", error_description="${check.description}"`;
    sendJson(res, 401, { error: check.error, error_description: check.description }, { 'WWW-Authenticate': challenge });
    return;
  }
  if (path === '/healthcheck' && (req.method === 'GET' || req.method === 'HEAD')) {
    stats.api_ok += 1;
    sendJson(res, 200, { status: 'ok', account: check.token.accountId });
    return;
  }
  if (path === '/test_report' && req.method === 'POST') {
    const chunks = [];
    let size = 0;
    for await (const chunk of req) {
      size += chunk.length;
      if (size > 16 * 1024 * 1024) {
        sendJson(res, 413, { error: 'too_large' });
        return;
      }
      chunks.push(chunk);
    }
    const body = Buffer.concat(chunks);
    let json = null;
    if (/^application\/json\b/i.test(req.headers['content-type'] || '')) {
      try {
        json = JSON.parse(body.toString('utf8'));
      } catch {
        sendJson(res, 400, { ok: false, error: 'the body is not JSON' });
        return;
      }
    }
    stats.api_ok += 1;
    sendJson(res, 200, {
      ok: true,
      bytes: body.length,
      content_type: req.headers['content-type'] || null,
      report: json,
    });
    return;
  }
  if (path === '/healthcheck' || path === '/test_report') {
    sendJson(res, 405, { error: 'method_not_allowed' });
    return;
  }
  sendJson(res, 404, { error: 'not_found', path });
}

// ==== the HTTP front ========================================================

function indexPage(base) {
  const verify = `${base}${ISSUER_PATH}/consent/openid/device-authorization`;
  return page('index', 'Local StandCloud', `
<p>This is a local authorization server for trying standcloud-auth.</p>
<ul>
<li>log in: <code>python standcloud_auth.py --url ${esc(base)} login</code></li>
<li>approve: open the link it shows, or <a href="${esc(verify)}">enter the code here</a>,
or run <code>python interop/approve.py &lt;link&gt;</code></li>
<li>discovery: <a href="${esc(base)}${ISSUER_PATH}/.well-known/openid-configuration">${esc(base)}${ISSUER_PATH}/.well-known/openid-configuration</a></li>
<li>Authelia 4.39.20's answers: <code>DENY_AS_SERVER_ERROR=${settings.denyAsServerError ? 1 : 0}</code>
(1: a Deny, a redeemed or an unknown device code get 500 <code>server_error</code> on every poll),
<code>EMPTY_DEVICE_AUTH_ERRORS=${settings.emptyDeviceAuthErrors ? 1 : 0}</code>
(1: a refused device authorization has the body <code>{}</code>); set them in the environment
of <code>node interop/server.js</code></li>
</ul>`);
}

function main() {
  const { host, port } = parseArgs(process.argv.slice(2));
  let provider;
  let base;
  let providerCallback;

  const server = http.createServer(async (req, res) => {
    const started = Date.now();
    if (settings.log) {
      res.on('finish', () => process.stderr.write(`${req.method} ${(req.originalUrl || req.url).split('?')[0]} ${res.statusCode} ${Date.now() - started}ms\n`));
    }
    try {
      const url = new URL(req.url, base);
      const path = url.pathname;
      let m;
      if (path.startsWith(`${API_PATH}/`)) {
        await api(provider, base, req, res, path.slice(API_PATH.length));
      } else if (path === '/__stats' && settings.stats) {
        sendJson(res, 200, stats);
      } else if ((m = /^\/auth\/interaction\/([A-Za-z0-9_-]+)$/.exec(path))
                 && (req.method === 'GET' || req.method === 'POST')) {
        await interaction(provider, req, res, m[1]);
      } else if (path === ISSUER_PATH || path.startsWith(`${ISSUER_PATH}/`)) {
        // Mount the provider under /auth, as Authelia sits on StandCloud.
        // RFC 8414 discovery also answers at /auth/.well-known/oauth-authorization-server.
        let inner = req.url.slice(ISSUER_PATH.length) || '/';
        if (inner.startsWith('/.well-known/oauth-authorization-server')) {
          inner = inner.replace('/.well-known/oauth-authorization-server', '/.well-known/openid-configuration');
        }
        req.originalUrl = `${ISSUER_PATH}${inner}`; // how oidc-provider finds its mount path
        req.url = inner;
        await providerCallback(req, res);
      } else if (path === '/.well-known/oauth-authorization-server/auth') {
        // RFC 8414 §3.1: the metadata of issuer B/auth
        req.url = '/.well-known/openid-configuration';
        req.originalUrl = `${ISSUER_PATH}${req.url}`;
        await providerCallback(req, res);
      } else if (path === '/' && req.method === 'GET') {
        sendHtml(res, 200, indexPage(base));
      } else {
        sendJson(res, 404, { error: 'not_found', path });
      }
    } catch (err) {
      process.stderr.write(`server.js: error: ${err.stack}\n`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error' });
      else res.destroy();
    }
  });

  server.on('error', (err) => {
    process.stderr.write(`server.js: error: ${err.message}\n`);
    process.exit(1);
  });

  server.listen(port, host, () => {
    const address = server.address();
    const shownHost = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    base = `http://${shownHost}:${address.port}`;
    provider = buildProvider(base);
    providerCallback = provider.callback();
    process.stdout.write(`READY ${base}\n`);
    const now = (on) => (on ? '1  (on) ' : '0  (off)');
    process.stderr.write([
      `local StandCloud at ${base} (oidc-provider; tokens live in memory)`,
      `  log in:   python standcloud_auth.py --url ${base} login`,
      `  approve:  open the link it shows in a browser (any login), or run`,
      `            python interop/approve.py <verification_uri_complete> [--deny]`,
      `  Authelia 4.39.20's own answers, switched on by environment variables (interop/README.md):`,
      `    DENY_AS_SERVER_ERROR=${now(settings.denyAsServerError)}  1: a Deny, a redeemed or an unknown device code`,
      `        get 500 server_error on that poll and every later one (0: access_denied, then invalid_grant)`,
      `    EMPTY_DEVICE_AUTH_ERRORS=${now(settings.emptyDeviceAuthErrors)}  1: a refused device authorization (unknown client,`,
      `        empty form, audience not allowed) keeps its HTTP status, with the body {}`,
      `    e.g. DENY_AS_SERVER_ERROR=1 EMPTY_DEVICE_AUTH_ERRORS=1 node interop/server.js --port ${address.port}`,
      `  stop:     Ctrl-C`,
      '',
    ].join('\n'));
  });

  const stop = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main();
