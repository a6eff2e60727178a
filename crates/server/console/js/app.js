// The console's shell: sign-in, the session (the connection string in sessionStorage only),
// the navigation, the theme, and a hash router that mounts one view at a time and runs the
// cleanup the view returned (closing its streams and timers) before the next.
//
// A view module exports `render(main, ctx, params)`; it may return a cleanup function.
// `ctx` = { api, facts, conn, can(right), navigate(hash), signOut() }.

import { Api, ApiError } from './api.js';
import { parseConnectionString } from './sas.js';
import { h, fill, field, notice, describe } from './ui.js';

const SESSION_KEY = 'twinhub.connectionString';
const THEME_KEY = 'twinhub.theme';

const VIEWS = [
  { path: 'overview', label: 'Overview', load: () => import('./views/overview.js') },
  { path: 'devices', label: 'Devices', load: () => import('./views/devices.js') },
  { path: 'jobs', label: 'Jobs', load: () => import('./views/jobs.js') },
  { path: 'routing', label: 'Routing', load: () => import('./views/routing.js') },
  { path: 'telemetry', label: 'Telemetry', load: () => import('./views/telemetry.js') },
];
const DEVICE_VIEW = () => import('./views/device.js');

const app = document.getElementById('app');
let ctx = null;
let cleanup = null;
let generation = 0;

function applyTheme(theme) {
  if (theme === 'light' || theme === 'dark') document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

function currentTheme() {
  return localStorage.getItem(THEME_KEY) || 'system';
}

function themeSelect() {
  const select = h('select', { id: 'theme', class: 'compact' },
    h('option', { value: 'system' }, 'System theme'),
    h('option', { value: 'light' }, 'Light'),
    h('option', { value: 'dark' }, 'Dark'));
  select.value = currentTheme();
  select.addEventListener('change', () => {
    localStorage.setItem(THEME_KEY, select.value);
    applyTheme(select.value);
  });
  return h('label', { class: 'theme' }, h('span', { class: 'visually-hidden' }, 'Theme'), select);
}

function signOut(message) {
  sessionStorage.removeItem(SESSION_KEY);
  ctx = null;
  if (cleanup) { try { cleanup(); } catch { /* the view is gone either way */ } }
  cleanup = null;
  history.replaceState(null, '', '#/');
  showSignIn(message);
}

/** Checks a connection string against the hub; resolves to a ready ctx or throws. */
async function connect(text) {
  const conn = parseConnectionString(text);
  const api = new Api(conn);
  const facts = await api.facts();
  const rights = new Set(facts.rights);
  return {
    api,
    facts,
    conn,
    can: (right) => rights.has(right) || (right === 'RegistryRead' && rights.has('RegistryWrite')),
    navigate: (hash) => { window.location.hash = hash; },
    signOut,
  };
}

function showSignIn(message) {
  document.title = 'Sign in · twinhub console';
  const input = h('textarea', {
    name: 'connectionString', rows: 3, required: true, autocomplete: 'off', spellcheck: 'false',
    placeholder: 'HostName=…;SharedAccessKeyName=iothubowner;SharedAccessKey=…',
  });
  const box = notice();
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'signin card', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'twinhub console'),
    h('p', {}, 'Paste a connection string of one of the hub\'s shared access policies. It stays in this browser tab (sessionStorage) and is removed when you sign out; the console sends the hub only SAS tokens it signs itself.'),
    field('Connection string', input, '`twinhub connection-string` prints iothubowner\'s.'),
    box,
    h('div', { class: 'actions' }, submit));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    box.clear();
    submit.disabled = true;
    try {
      ctx = await connect(input.value);
      sessionStorage.setItem(SESSION_KEY, input.value.trim());
      showShell();
    } catch (e) {
      const text = e instanceof ApiError && e.status === 401
        ? `The hub refused this connection string: ${describe(e)}`
        : describe(e);
      box.show('error', text);
      input.focus();
    } finally {
      submit.disabled = false;
    }
  });
  fill(app, h('main', { id: 'main', class: 'signin-page' }, form, h('div', { class: 'signin-theme' }, themeSelect())));
  if (message) box.show('error', message);
  input.focus();
}

function showShell() {
  const nav = h('nav', { 'aria-label': 'Main' },
    h('ul', {}, VIEWS.map((v) => h('li', {}, h('a', { href: `#/${v.path}`, dataset: { path: v.path } }, v.label)))));
  const main = h('main', { id: 'main', tabindex: '-1' });
  const header = h('header', { class: 'top' },
    h('a', { class: 'brand', href: '#/overview' }, 'twinhub'),
    h('span', { class: 'hub-name', title: ctx.facts.hostName }, ctx.facts.hubName),
    nav,
    h('div', { class: 'session' },
      h('span', { class: 'policy', title: `Rights: ${ctx.facts.rights.join(', ')}` }, ctx.facts.policy),
      themeSelect(),
      h('button', { type: 'button', class: 'small', onclick: () => signOut() }, 'Sign out')));
  const missing = ['RegistryRead', 'RegistryWrite', 'ServiceConnect'].filter((r) => !ctx.can(r));
  const limits = missing.length === 0 ? null : h('p', { class: 'notice warn rights-note', role: 'note' },
    `Policy ${ctx.facts.policy} does not grant ${missing.join(' or ')}: `
    + [
      missing.includes('RegistryRead') ? 'the registry and twins cannot be read' : null,
      missing.includes('RegistryWrite') ? 'devices, twins, jobs and routing cannot be changed' : null,
      missing.includes('ServiceConnect') ? 'direct methods, cloud-to-device messages and telemetry are unavailable' : null,
    ].filter(Boolean).join('; ')
    + '. Those controls are disabled.');
  fill(app, header, limits, main);
  route();
}

function parseHash() {
  const parts = window.location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  return parts.filter((p, i) => p !== '' || i === 0);
}

async function route() {
  if (!ctx) return;
  const main = document.getElementById('main');
  if (!main) return;
  const [first, ...rest] = parseHash();
  let loader;
  let params = {};
  let active = first;
  if (first === 'devices' && rest.length >= 1) {
    loader = DEVICE_VIEW;
    params = { deviceId: rest[0], tab: rest[1] || null, moduleId: rest[1] === 'modules' ? rest[2] : null };
  } else {
    const view = VIEWS.find((v) => v.path === first) || VIEWS[0];
    loader = view.load;
    active = view.path;
  }
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.path === active) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (cleanup) { try { cleanup(); } catch { /* ignore */ } }
  cleanup = null;
  const mine = ++generation;
  fill(main, h('p', { class: 'loading' }, 'Loading…'));
  try {
    const module = await loader();
    if (mine !== generation) return;
    main.replaceChildren();
    const done = await module.render(main, ctx, params);
    if (mine !== generation) { if (typeof done === 'function') done(); return; }
    cleanup = typeof done === 'function' ? done : null;
    document.title = `${main.querySelector('h1')?.textContent || 'twinhub'} · twinhub console`;
    main.querySelector('h1')?.focus({ preventScroll: true });
  } catch (e) {
    if (mine !== generation) return;
    if (e instanceof ApiError && e.status === 401) {
      signOut(`The hub no longer accepts this connection string: ${describe(e)}`);
      return;
    }
    fill(main, h('div', { class: 'notice error', role: 'alert' }, describe(e)));
  }
}

window.addEventListener('hashchange', route);
applyTheme(currentTheme());

(async () => {
  const saved = sessionStorage.getItem(SESSION_KEY);
  if (!saved) { showSignIn(); return; }
  try {
    ctx = await connect(saved);
    showShell();
  } catch (e) {
    signOut(`Signed out: ${describe(e)}`);
  }
})();
