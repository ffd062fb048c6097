// The hsd console: one page, hash routes, every action through /api/v1 (the same routes
// scripts use). Data from the server is only ever inserted as text, never as markup.
'use strict';

const main = () => document.getElementById('main');
let timer = null;

// ----- small helpers -----

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'class') node.className = value;
    else if (value === true) node.setAttribute(key, '');
    else if (value !== false && value != null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child == null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function table(id, headings, rows) {
  return el('div', { class: 'scroll' },
    el('table', { id },
      el('thead', {}, el('tr', {}, headings.map((h) => el('th', {}, h)))),
      el('tbody', {}, rows)));
}

function pill(text, kind) {
  return el('span', { class: 'pill ' + (kind || '') }, text);
}

function when(text) {
  if (!text) return '—';
  const t = new Date(text);
  return isNaN(t) ? text : t.toLocaleString();
}

function cookie(name) {
  const hit = document.cookie.split(';').map((c) => c.trim().split('=')).find(([k]) => k === name);
  return hit ? hit[1] : '';
}

function say(text, kind) {
  const box = document.getElementById('message');
  box.textContent = text;
  box.className = kind || 'error';
  box.hidden = !text;
}

class ApiError extends Error {}

async function api(method, path, body) {
  const options = { method, credentials: 'same-origin', headers: {} };
  if (method !== 'GET') options.headers['X-CSRF-Token'] = cookie('hsd_csrf');
  if (body !== undefined) {
    options.headers['Content-Type'] = 'application/json';
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  let data = null;
  try { data = await response.json(); } catch (_) { /* an empty answer */ }
  if (response.status === 401) {
    showLogin();
    throw new ApiError('Your session ended: log in again.');
  }
  if (!response.ok) throw new ApiError((data && data.message) || `${response.status} ${response.statusText}`);
  return data;
}

// Runs an action; a refusal is shown with the server's reason and nothing else happens.
async function act(work, done) {
  try {
    await work();
    if (done) say(done, 'info');
    await route(false);
  } catch (error) {
    say(error.message);
  }
}

function inAnHourOr(choice) {
  const hours = { '1h': 1, '1d': 24, '7d': 168, '90d': 2160 }[choice] || 1;
  return new Date(Date.now() + hours * 3600 * 1000).toISOString();
}

function secretBox(id, label, secret) {
  return el('div', { class: 'secret', id },
    el('span', {}, label),
    el('code', { class: 'mono' }, secret),
    el('button', { type: 'button', class: 'secondary', onclick: () => navigator.clipboard.writeText(secret).then(() => say('Copied.', 'info')) }, 'Copy'));
}

// ----- login -----

function showLogin() {
  clearInterval(timer);
  document.getElementById('nav').hidden = true;
  const input = el('input', { id: 'api-key', type: 'password', autocomplete: 'off', placeholder: 'hskey-api-…', required: true });
  const form = el('form', { id: 'login', class: 'inline card', onsubmit: async (event) => {
    event.preventDefault();
    const response = await fetch('/admin/login', {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ apiKey: input.value }),
    });
    if (!response.ok) {
      const data = await response.json().catch(() => ({}));
      say(data.message || 'Login refused.');
      return;
    }
    say('');
    location.hash = location.hash || '#cluster';
    await route(true);
  } },
  el('label', {}, 'API key', input),
  el('button', { type: 'submit' }, 'Log in'));
  main().replaceChildren(el('h2', {}, 'Log in'),
    el('p', {}, 'Paste an API key (hsctl apikeys create).'), form);
  offerIdentityProvider();
}

// With oidc.admin_users or oidc.admin_groups configured, admins may log in through the
// identity provider instead (it brings the company's MFA).
async function offerIdentityProvider() {
  const offer = await fetch('/admin/oidc', { credentials: 'same-origin' })
    .then((r) => r.json()).catch(() => ({}));
  const form = document.getElementById('login');
  if (!offer.enabled || !form || document.getElementById('oidc-login')) return;
  form.after(el('p', {}, el('a', { id: 'oidc-login', class: 'button', href: '/admin/oidc/login' },
    'Log in with your identity provider')));
}

// ----- pages -----

async function clusterPage(root) {
  const status = await api('GET', '/api/v1/cluster/status');
  const rows = status.members.map((m) => el('tr', { 'data-member': m.id, class: m.healthy ? '' : 'unhealthy' },
    el('td', {}, m.id),
    el('td', {}, m.name || '—'),
    el('td', {}, pill(m.role, m.role === 'leader' ? 'leader' : (m.healthy ? '' : 'bad'))),
    el('td', { class: 'health' }, m.healthy ? pill('healthy', 'online') : pill('unreachable', 'bad')),
    el('td', {}, m.lastApplied ?? '—'),
    el('td', {}, m.matchIndex ?? '—'),
    el('td', { class: 'clients' }, m.clients ?? '—'),
    el('td', {}, m.version || '—'),
    el('td', { class: 'mono' }, m.address),
    el('td', {}, m.voter ? 'voter' : 'learner', m.draining ? ' (draining)' : '')));
  root.replaceChildren(el('h2', {}, 'Cluster'),
    el('p', { class: 'summary', id: 'cluster-summary' },
      `Leader: member ${status.leader ?? 'none'} · term ${status.term} · this page is served by member ${status.memberId}`),
    table('members', ['ID', 'Name', 'Role', 'Health', 'Applied', 'Match', 'Clients', 'Version', 'Address', 'Vote'], rows));
}

async function nodesPage(root) {
  const nodes = (await api('GET', '/api/v1/node')).nodes;
  const search = el('input', { id: 'node-search', type: 'search', placeholder: 'Search name, user, address, tag', value: sessionStorage.nodeSearch || '' });
  const body = el('div', {});
  const draw = () => {
    const needle = search.value.trim().toLowerCase();
    sessionStorage.nodeSearch = search.value;
    const shown = nodes.filter((n) => !needle || [n.givenName, n.name, n.user && n.user.name, ...n.ipAddresses, ...n.tags]
      .some((v) => v && v.toLowerCase().includes(needle)));
    body.replaceChildren(table('nodes', ['ID', 'Name', 'User', 'Addresses', 'Status', 'Member', 'Tags', 'Routes', 'Expiry', ''],
      shown.map(nodeRow)));
  };
  search.addEventListener('input', draw);
  root.replaceChildren(el('h2', {}, 'Nodes'), el('div', { class: 'card' }, search), body, el('div', { id: 'node-panel' }));
  draw();
}

function nodeRow(n) {
  return el('tr', { 'data-node': n.id },
    el('td', {}, n.id),
    el('td', { class: 'node-name' }, n.givenName, n.name !== n.givenName ? el('div', { class: 'summary' }, n.name) : null),
    el('td', {}, n.user ? n.user.name : pill('tagged')),
    el('td', { class: 'mono' }, n.ipAddresses.join(' ')),
    el('td', { class: 'online-cell' }, n.online ? pill('online', 'online') : pill('offline', 'offline'), n.expired ? pill('expired', 'bad') : null, n.approved ? null : pill('awaiting approval', 'bad')),
    el('td', { class: 'member-cell' }, n.member ?? '—'),
    el('td', {}, n.tags.map((t) => pill(t))),
    el('td', { class: 'mono' }, n.availableRoutes.map((r) => pill(r + (n.approvedRoutes.includes(r) ? ' ✓' : ''), n.subnetRoutes.includes(r) ? 'online' : ''))),
    el('td', {}, when(n.expiry)),
    el('td', {}, el('button', { type: 'button', class: 'secondary edit-node', onclick: () => nodePanel(n) }, 'Manage')));
}

function nodePanel(n) {
  const panel = document.getElementById('node-panel');
  const name = el('input', { id: 'rename-node', value: n.givenName });
  const tags = el('input', { id: 'node-tags', value: n.tags.join(','), placeholder: 'tag:a,tag:b' });
  const routes = n.availableRoutes.map((r) => el('label', { class: 'check' },
    el('input', { type: 'checkbox', class: 'route', value: r, checked: n.approvedRoutes.includes(r) }), ' ' + r));
  const base = `/api/v1/node/${n.id}`;
  let confirmDelete = false;
  panel.replaceChildren(el('div', { class: 'card', id: `manage-${n.id}` },
    el('h3', {}, `Node ${n.id}: ${n.givenName}`),
    el('form', { class: 'inline', onsubmit: (e) => { e.preventDefault(); act(() => api('POST', `${base}/rename/${encodeURIComponent(name.value.trim())}`), 'Renamed.'); } },
      el('label', {}, 'Name', name), el('button', { type: 'submit', id: 'rename-save' }, 'Rename')),
    el('form', { class: 'inline', onsubmit: (e) => { e.preventDefault(); act(() => api('POST', `${base}/tags`, { tags: tags.value.split(',').map((t) => t.trim()).filter(Boolean) }), 'Tags saved.'); } },
      el('label', {}, 'Tags', tags), el('button', { type: 'submit', id: 'tags-save' }, 'Save tags')),
    el('h3', {}, 'Routes'),
    routes.length ? el('form', { class: 'inline', onsubmit: (e) => { e.preventDefault(); act(() => api('POST', `${base}/approve_routes`, { routes: [...panel.querySelectorAll('input.route:checked')].map((c) => c.value) }), 'Routes saved.'); } },
      routes, el('button', { type: 'submit', id: 'routes-save' }, 'Approve checked routes')) : el('p', { class: 'summary' }, 'This node advertises no routes.'),
    el('div', { class: 'actions' },
      n.approved ? null : el('button', { type: 'button', id: 'approve-node', onclick: () => act(() => api('POST', `${base}/approve`), 'Approved.') }, 'Approve node'),
      el('button', { type: 'button', class: 'secondary', id: 'expire-node', onclick: () => act(() => api('POST', `${base}/expire`), 'Expired: the node must log in again.') }, 'Expire key'),
      el('button', { type: 'button', class: 'danger', id: 'delete-node', onclick: (e) => {
        if (!confirmDelete) { confirmDelete = true; e.target.textContent = 'Click again to delete'; return; }
        act(() => api('DELETE', base), 'Deleted.');
      } }, 'Delete'))));
}

async function usersPage(root) {
  const users = (await api('GET', '/api/v1/user')).users;
  const name = el('input', { id: 'user-name', required: true, placeholder: 'alice' });
  const display = el('input', { id: 'user-display', placeholder: 'Alice Example' });
  const email = el('input', { id: 'user-email', type: 'text', placeholder: 'alice@example.com' });
  const form = el('form', { id: 'user-form', class: 'inline card', onsubmit: (e) => {
    e.preventDefault();
    act(() => api('POST', '/api/v1/user', { name: name.value.trim(), displayName: display.value.trim(), email: email.value.trim() }), 'User created.');
  } }, el('label', {}, 'Name', name), el('label', {}, 'Display name', display), el('label', {}, 'Email', email),
  el('button', { type: 'submit', id: 'user-create' }, 'Create user'));
  const rows = users.map((u) => {
    const rename = el('input', { class: 'rename-user', value: u.name, 'aria-label': `New name for ${u.name}` });
    return el('tr', { 'data-user': u.name },
      el('td', {}, u.id), el('td', { class: 'user-name' }, u.name), el('td', {}, u.displayName || '—'), el('td', {}, u.email || '—'),
      el('td', {}, when(u.createdAt)),
      el('td', {}, el('div', { class: 'actions' }, rename,
        el('button', { type: 'button', class: 'secondary', onclick: () => act(() => api('POST', `/api/v1/user/${u.id}/rename/${encodeURIComponent(rename.value.trim())}`), 'Renamed.') }, 'Rename'),
        el('button', { type: 'button', class: 'danger delete-user', onclick: () => act(() => api('DELETE', `/api/v1/user/${u.id}`), 'User deleted.') }, 'Delete'))));
  });
  root.replaceChildren(el('h2', {}, 'Users'), form, table('users', ['ID', 'Name', 'Display name', 'Email', 'Created', ''], rows));
}

async function keysPage(root, created) {
  const [users, keys] = await Promise.all([api('GET', '/api/v1/user'), api('GET', '/api/v1/preauthkey')]);
  const user = el('select', { id: 'key-user' }, el('option', { value: '' }, '(tags only)'), users.users.map((u) => el('option', { value: u.id }, u.name)));
  const reusable = el('input', { id: 'key-reusable', type: 'checkbox' });
  const ephemeral = el('input', { id: 'key-ephemeral', type: 'checkbox' });
  const expiry = el('select', { id: 'key-expiry' }, ['1h', '1d', '7d', '90d'].map((v) => el('option', { value: v }, v)));
  const tags = el('input', { id: 'key-tags', placeholder: 'tag:a,tag:b' });
  const form = el('form', { id: 'key-form', class: 'inline card', onsubmit: async (e) => {
    e.preventDefault();
    try {
      const answer = await api('POST', '/api/v1/preauthkey', {
        user: user.value || '0', reusable: reusable.checked, ephemeral: ephemeral.checked,
        expiration: inAnHourOr(expiry.value), aclTags: tags.value.split(',').map((t) => t.trim()).filter(Boolean),
      });
      say('Key created: copy it now, it is not shown again.', 'info');
      await keysPage(root, answer.preAuthKey.key);
    } catch (error) { say(error.message); }
  } }, el('label', {}, 'User', user), el('label', { class: 'check' }, reusable, ' reusable'), el('label', { class: 'check' }, ephemeral, ' ephemeral'),
  el('label', {}, 'Expires in', expiry), el('label', {}, 'Tags', tags), el('button', { type: 'submit', id: 'key-create' }, 'Create key'));
  const rows = keys.preAuthKeys.map((k) => el('tr', { 'data-key': k.id },
    el('td', {}, k.id), el('td', { class: 'mono' }, k.key), el('td', {}, k.user ? k.user.name : '—'),
    el('td', {}, k.reusable ? 'yes' : 'no'), el('td', {}, k.ephemeral ? 'yes' : 'no'), el('td', {}, k.used ? 'yes' : 'no'),
    el('td', {}, k.expired ? pill('expired', 'bad') : when(k.expiration)), el('td', {}, k.aclTags.map((t) => pill(t))),
    el('td', {}, el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'secondary', onclick: () => act(() => api('POST', '/api/v1/preauthkey/expire', { id: k.id }), 'Key expired.') }, 'Expire'),
      el('button', { type: 'button', class: 'danger', onclick: () => act(() => api('DELETE', `/api/v1/preauthkey?id=${k.id}`), 'Key deleted.') }, 'Delete')))));
  root.replaceChildren(el('h2', {}, 'Pre-auth keys'), form,
    created ? secretBox('new-key', 'New key:', created) : null,
    table('keys', ['ID', 'Key', 'User', 'Reusable', 'Ephemeral', 'Used', 'Expiration', 'Tags', ''], rows));
}

async function apiKeysPage(root, created) {
  const keys = (await api('GET', '/api/v1/apikey')).apiKeys;
  const expiry = el('select', { id: 'apikey-expiry' }, ['90d', '7d', '1d', '1h'].map((v) => el('option', { value: v }, v)));
  const form = el('form', { id: 'apikey-form', class: 'inline card', onsubmit: async (e) => {
    e.preventDefault();
    try {
      const answer = await api('POST', '/api/v1/apikey', { expiration: inAnHourOr(expiry.value) });
      say('API key created: copy it now, it is not shown again.', 'info');
      await apiKeysPage(root, answer.apiKey);
    } catch (error) { say(error.message); }
  } }, el('label', {}, 'Expires in', expiry), el('button', { type: 'submit', id: 'apikey-create' }, 'Create API key'));
  const rows = keys.map((k) => el('tr', {},
    el('td', {}, k.id), el('td', { class: 'mono' }, k.prefix), el('td', {}, when(k.createdAt)),
    el('td', {}, k.expired ? pill('expired', 'bad') : when(k.expiration)), el('td', {}, when(k.lastSeen)),
    el('td', {}, el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'secondary', onclick: () => act(() => api('POST', '/api/v1/apikey/expire', { id: k.id }), 'API key expired.') }, 'Expire'),
      el('button', { type: 'button', class: 'danger', onclick: () => act(() => api('DELETE', `/api/v1/apikey/${encodeURIComponent(k.prefix)}`), 'API key deleted.') }, 'Delete')))));
  root.replaceChildren(el('h2', {}, 'API keys'), form,
    created ? secretBox('new-api-key', 'New API key:', created) : null,
    table('apikeys', ['ID', 'Prefix', 'Created', 'Expiration', 'Last used', ''], rows));
}

// A line diff (longest common subsequence): policies are small.
function diffLines(before, after) {
  const a = before.split('\n');
  const b = after.split('\n');
  const n = a.length;
  const m = b.length;
  const common = Array.from({ length: n + 1 }, () => new Array(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      common[i][j] = a[i] === b[j] ? common[i + 1][j + 1] + 1 : Math.max(common[i + 1][j], common[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && a[i] === b[j]) { out.push(['same', '  ' + a[i]]); i++; j++; }
    else if (j < m && (i === n || common[i][j + 1] >= common[i + 1][j])) { out.push(['add', '+ ' + b[j]]); j++; }
    else { out.push(['del', '- ' + a[i]]); i++; }
  }
  return out;
}

async function policyPage(root) {
  const [current, history] = await Promise.all([api('GET', '/api/v1/policy'), api('GET', '/api/v1/policy/history')]);
  const text = el('textarea', { id: 'policy-text', spellcheck: 'false' });
  text.value = current.policy;
  const diff = el('pre', { class: 'diff', id: 'policy-diff', hidden: true });
  const check = () => api('POST', '/api/v1/policy/check', { policy: text.value });
  const editor = el('div', { class: 'card' },
    el('p', { class: 'summary' }, current.updatedAt ? `Running since ${when(current.updatedAt)}` : 'No policy set: every node reaches every node.'),
    text,
    el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'secondary', id: 'policy-check', onclick: async () => {
        try { await check(); say('The policy is valid.', 'info'); } catch (error) { say(error.message); }
      } }, 'Validate'),
      el('button', { type: 'button', id: 'policy-save', onclick: () => act(async () => {
        await check();
        await api('PUT', '/api/v1/policy', { policy: text.value });
      }, 'Policy saved.') }, 'Save')));
  const rows = history.versions.slice().reverse().map((v) => el('tr', { 'data-version': v.version },
    el('td', {}, v.version), el('td', {}, when(v.createdAt)), el('td', {}, v.current ? pill('running', 'online') : ''),
    el('td', {}, el('div', { class: 'actions' },
      el('button', { type: 'button', class: 'secondary show-diff', onclick: () => {
        diff.replaceChildren(...diffLines(current.policy, v.policy).map(([kind, line]) => el('div', { class: kind }, line)));
        diff.hidden = false;
      } }, 'Diff with running'),
      v.current ? null : el('button', { type: 'button', class: 'rollback', onclick: () => act(() => api('POST', '/api/v1/policy/rollback', { version: v.version }), `Version ${v.version} is running again.`) }, 'Roll back')))));
  root.replaceChildren(el('h2', {}, 'Policy'), editor, el('h3', {}, 'History'),
    table('policy-history', ['Version', 'Accepted', '', ''], rows), diff);
}

async function auditPage(root) {
  const actor = el('input', { id: 'audit-actor', placeholder: 'actor, e.g. apikey:…', value: sessionStorage.auditActor || '' });
  const query = actor.value.trim() ? `?actor=${encodeURIComponent(actor.value.trim())}` : '';
  const records = (await api('GET', '/api/v1/audit' + query)).records.slice().reverse();
  const form = el('form', { class: 'inline card', onsubmit: (e) => { e.preventDefault(); sessionStorage.auditActor = actor.value; route(false); } },
    el('label', {}, 'Actor', actor), el('button', { type: 'submit' }, 'Filter'));
  const rows = records.map((r) => el('tr', {},
    el('td', {}, when(r.time)), el('td', { class: 'mono' }, r.actor), el('td', {}, r.action), el('td', {}, r.target), el('td', {}, r.result)));
  root.replaceChildren(el('h2', {}, 'Audit log'), form, table('audit', ['Time', 'Actor', 'Action', 'Target', 'Result'], rows));
}

const pages = {
  cluster: { draw: clusterPage, every: 2000 },
  nodes: { draw: nodesPage, every: 5000 },
  users: { draw: usersPage },
  keys: { draw: keysPage },
  apikeys: { draw: apiKeysPage },
  policy: { draw: policyPage },
  audit: { draw: auditPage },
};

// Draws the page the hash names; `fresh` clears the message (a new visit, not a redraw).
async function route(fresh) {
  clearInterval(timer);
  const name = (location.hash || '#cluster').slice(1);
  const page = pages[name] || pages.cluster;
  document.getElementById('nav').hidden = false;
  for (const link of document.querySelectorAll('nav a')) link.classList.toggle('current', link.getAttribute('href') === '#' + name);
  if (fresh) say('');
  // Each visit draws into its own element: a redraw of the page just left that is still
  // waiting for its answer then lands in a detached element, not over this page.
  const root = el('div', { class: 'page' });
  main().replaceChildren(root);
  main().dataset.page = name;
  try {
    await page.draw(root);
  } catch (error) {
    if (error instanceof ApiError || error instanceof TypeError) { if (root.isConnected) say(error.message || 'This member did not answer.'); }
    else throw error;
  }
  if (page.every && root.isConnected) {
    timer = setInterval(async () => {
      // Live pages redraw unless the admin is typing or a panel is open.
      const busy = document.activeElement && ['INPUT', 'TEXTAREA', 'SELECT'].includes(document.activeElement.tagName);
      if (busy || document.querySelector('#node-panel .card')) return;
      try { await page.draw(root); main().dataset.refreshed = Date.now(); } catch (error) { if (root.isConnected) say(error.message || 'This member did not answer.'); }
    }, page.every);
  }
}

window.addEventListener('hashchange', () => route(true));
window.addEventListener('DOMContentLoaded', async () => {
  document.getElementById('logout').addEventListener('click', async () => {
    await fetch('/admin/logout', { method: 'POST', credentials: 'same-origin', headers: { 'X-CSRF-Token': cookie('hsd_csrf') } });
    say('Logged out.', 'info');
    showLogin();
  });
  const probe = await fetch('/api/v1/health', { credentials: 'same-origin' });
  if (probe.status === 401) showLogin();
  else await route(true);
});
