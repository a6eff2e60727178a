// One device: its identity and keys, the twin editor (tags and desired editable, reported
// read-only, etag conflicts shown and resolvable), a direct-method form, cloud-to-device send,
// live telemetry, and modules. Route: #/devices/<id>[/<tab>[/<moduleId>]].
//
// The header's pills follow the device live (GET every 2 s). Tabs switch in place and rewrite
// the hash with history.replaceState, so the router does not remount the view; a tab's panel is
// built the first time it is shown and told when it is hidden (telemetry stops its stream).

import {
  h, fill, field, notice, busy, describe, copyButton, needs, time, pretty, parseJson,
} from '../ui.js';
import { randomKey } from '../sas.js';
import { ApiError } from '../api.js';
import {
  deviceConnectionString, statusPill, connectionPill, setPill, setDeviceStatus, deleteDevice,
} from './devices.js';

const LIVE_MS = 2000;
const MAX_EVENTS = 200;

const TABS = [
  { slug: 'identity', label: 'Identity', build: identityTab },
  { slug: 'twin', label: 'Twin', build: twinTab },
  { slug: 'method', label: 'Direct method', build: methodTab },
  { slug: 'c2d', label: 'Cloud-to-device', build: c2dTab },
  { slug: 'telemetry', label: 'Telemetry', build: telemetryTab },
  { slug: 'modules', label: 'Modules', build: modulesTab },
];

const enc = encodeURIComponent;

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function sameJson(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== 'object') return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  if (Array.isArray(a)) return a.length === b.length && a.every((x, i) => sameJson(x, b[i]));
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.hasOwn(b, k) && sameJson(a[k], b[k]));
}

/**
 * The JSON merge patch (RFC 7386, as IoT Hub's twin PATCH reads it) turning `from` into `to`:
 * changed keys with their new values, removed keys as null, nested objects patched key by key.
 * Undefined when nothing changed.
 */
export function mergePatch(from, to) {
  if (!isObject(from) || !isObject(to)) return sameJson(from, to) ? undefined : to;
  const patch = {};
  for (const k of Object.keys(from)) if (!Object.hasOwn(to, k)) patch[k] = null;
  for (const [k, v] of Object.entries(to)) {
    if (!Object.hasOwn(from, k)) { patch[k] = v; continue; }
    const sub = mergePatch(from[k], v);
    if (sub !== undefined) patch[k] = sub;
  }
  return Object.keys(patch).length ? patch : undefined;
}

/** Applies a merge patch to a copy of `target`. */
function applyPatch(target, patch) {
  if (!isObject(patch)) return patch;
  const out = isObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = applyPatch(out[k], v);
  }
  return out;
}

/** A twin section without IoT Hub's bookkeeping ($metadata, $version). */
function userProps(section) {
  const out = {};
  for (const [k, v] of Object.entries(section || {})) if (k !== '$metadata' && k !== '$version') out[k] = v;
  return out;
}

/** A JSON textarea in a labelled field, with its error shown next to it. */
function jsonField(label, hint, rows = 10) {
  const ta = h('textarea', { class: 'code', rows, spellcheck: 'false', autocomplete: 'off' });
  const wrap = field(label, ta, hint);
  const err = h('small', { class: 'field-error', id: `${ta.id}-error`, hidden: true });
  wrap.append(err);
  const described = ta.getAttribute('aria-describedby');
  ta.setAttribute('aria-describedby', [described, err.id].filter(Boolean).join(' '));
  const self = {
    wrap,
    ta,
    /** Parses the text, insisting on a JSON object when `object`; shows the error and throws. */
    read(object = true) {
      self.clear();
      try {
        const value = parseJson(ta.value, label);
        if (object && !isObject(value)) throw new Error(`${label} must be a JSON object ({...}).`);
        return value;
      } catch (e) {
        err.textContent = e.message;
        err.hidden = false;
        ta.setAttribute('aria-invalid', 'true');
        ta.focus();
        throw e;
      }
    },
    clear() {
      err.hidden = true;
      err.textContent = '';
      ta.removeAttribute('aria-invalid');
    },
  };
  ta.addEventListener('input', () => { if (!err.hidden) self.clear(); });
  return self;
}

/** A notice whose content is nodes (text, buttons) rather than one string. */
function richNotice(kind, ...children) {
  return h('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, children);
}

function props(pairs) {
  return h('dl', { class: 'props' }, pairs.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function authName(type) {
  return {
    sas: 'Symmetric key (SAS)', selfSigned: 'X.509 self-signed', certificateAuthority: 'X.509 CA signed', none: 'None',
  }[type] || type || '';
}

function neverOr(iso) {
  return time(iso) || 'Never';
}

/* ------------------------------------------------------------------------------------------ */

export async function render(main, ctx, params) {
  const deviceId = params.deviceId;
  const path = `/devices/${enc(deviceId)}`;
  const canRead = ctx.can('RegistryRead');
  const canWrite = ctx.can('RegistryWrite');
  const canService = ctx.can('ServiceConnect');

  // The identity, or what the twin says of it when the policy may not read the registry.
  async function loadDevice() {
    if (canRead) return ctx.api.get(path);
    const t = await ctx.api.get(`/twins/${enc(deviceId)}`);
    return {
      deviceId: t.deviceId, status: t.status, connectionState: t.connectionState,
      lastActivityTime: t.lastActivityTime, cloudToDeviceMessageCount: t.cloudToDeviceMessageCount,
      statusUpdatedTime: t.statusUpdateTime, authentication: { type: t.authenticationType, x509Thumbprint: t.x509Thumbprint },
      etag: t.deviceEtag, partial: true,
    };
  }

  let device;
  try {
    device = await loadDevice();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) throw e;
    main.append(
      h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, deviceId)),
      richNotice('error', describe(e)),
      h('p', {}, h('a', { href: '#/devices' }, 'Back to the device list')));
    return undefined;
  }

  const state = { device, listeners: new Set() };
  const headBox = notice();
  const sPill = statusPill(device.status);
  const cPill = connectionPill(device.connectionState);
  const toggle = needs(h('button', { type: 'button' }), canWrite && canRead, 'RegistryWrite');
  const del = needs(h('button', { type: 'button', class: 'danger', 'aria-label': `Delete ${deviceId}` }, 'Delete'), canWrite, 'RegistryWrite');

  function showStatus(d) {
    const disabled = String(d.status).toLowerCase() === 'disabled';
    setPill(sPill, disabled ? 'Disabled' : 'Enabled');
    setPill(cPill, d.connectionState === 'Connected' ? 'Connected' : 'Disconnected');
    const label = disabled ? 'Enable' : 'Disable';
    if (toggle.textContent !== label) {
      toggle.textContent = label;
      toggle.setAttribute('aria-label', `${label} ${deviceId}`);
    }
  }
  showStatus(device);

  function update(d) {
    state.device = d;
    showStatus(d);
    for (const fn of state.listeners) fn(d);
  }

  toggle.addEventListener('click', () => busy(toggle, headBox, async () => {
    headBox.clear();
    const wanted = String(state.device.status).toLowerCase() === 'disabled' ? 'enabled' : 'disabled';
    update(await setDeviceStatus(ctx, deviceId, wanted));
    headBox.show('ok', `Device ${deviceId} is now ${wanted}.`);
  }));
  del.addEventListener('click', () => busy(del, headBox, async () => {
    headBox.clear();
    if (await deleteDevice(ctx, deviceId)) {
      stopped = true;
      ctx.navigate('#/devices');
    }
  }));

  // Tabs.
  const tablist = h('div', { role: 'tablist', 'aria-label': `Device ${deviceId}` });
  const panels = h('div', { class: 'tab-panels' });
  const built = new Map(); // slug -> {panel, hooks}
  let current = null;
  const tabButtons = TABS.map((t) => {
    const b = h('button', {
      type: 'button', role: 'tab', id: `tab-${t.slug}`, 'aria-controls': `panel-${t.slug}`,
      'aria-selected': 'false', tabindex: '-1',
    }, t.label);
    b.addEventListener('click', () => select(t.slug, false));
    return b;
  });
  tablist.append(...tabButtons);
  tablist.addEventListener('keydown', (ev) => {
    const i = TABS.findIndex((t) => t.slug === current);
    let j = null;
    if (ev.key === 'ArrowRight') j = (i + 1) % TABS.length;
    else if (ev.key === 'ArrowLeft') j = (i - 1 + TABS.length) % TABS.length;
    else if (ev.key === 'Home') j = 0;
    else if (ev.key === 'End') j = TABS.length - 1;
    if (j === null) return;
    ev.preventDefault();
    select(TABS[j].slug, true);
  });

  const shared = {
    ctx, deviceId, path, state, canRead, canWrite, canService, params,
    onDevice(fn) { state.listeners.add(fn); },
  };

  function select(slug, focus) {
    const tab = TABS.find((t) => t.slug === slug) || TABS[0];
    if (current === tab.slug) { if (focus) tabButtons[TABS.indexOf(tab)].focus(); return; }
    if (current) {
      const old = built.get(current);
      old.panel.hidden = true;
      old.hooks?.hide?.();
    }
    current = tab.slug;
    TABS.forEach((t, i) => {
      const on = t.slug === tab.slug;
      tabButtons[i].setAttribute('aria-selected', String(on));
      tabButtons[i].tabIndex = on ? 0 : -1;
    });
    let entry = built.get(tab.slug);
    if (!entry) {
      const panel = h('div', {
        role: 'tabpanel', id: `panel-${tab.slug}`, 'aria-labelledby': `tab-${tab.slug}`, tabindex: '0', class: 'tab-panel',
      });
      panels.append(panel);
      entry = { panel, hooks: null };
      built.set(tab.slug, entry);
      entry.hooks = tab.build(panel, shared) || null;
    } else {
      entry.panel.hidden = false;
    }
    entry.hooks?.show?.();
    if (focus) tabButtons[TABS.indexOf(tab)].focus();
    const hash = `#/devices/${enc(deviceId)}/${tab.slug}`;
    if (window.location.hash !== hash && !(tab.slug === 'modules' && params.moduleId && window.location.hash.startsWith(hash))) {
      history.replaceState(null, '', hash);
    }
  }

  main.append(
    h('div', { class: 'page-head device-head' },
      h('h1', { tabindex: '-1', class: 'device-title' }, deviceId),
      h('span', { class: 'device-pills' }, sPill, cPill),
      h('div', { class: 'actions' }, toggle, del)),
    h('p', { class: 'crumbs' }, h('a', { href: '#/devices' }, '← All devices')),
    headBox,
    tablist,
    panels);

  select(TABS.some((t) => t.slug === params.tab) ? params.tab : 'identity', false);

  // Live header (and identity tab) every 2 s.
  let stopped = false;
  let polling = false;
  const timer = setInterval(async () => {
    if (stopped || polling || document.hidden) return;
    polling = true;
    try {
      const d = await loadDevice();
      if (!stopped) update(d);
    } catch (e) {
      if (stopped) return;
      if (e instanceof ApiError && e.status === 404) {
        headBox.show('error', `${describe(e)} (the device was deleted).`);
        clearInterval(timer);
      }
    } finally {
      polling = false;
    }
  }, LIVE_MS);

  return () => {
    stopped = true;
    clearInterval(timer);
    for (const { hooks } of built.values()) {
      try { hooks?.dispose?.(); } catch { /* the view is going away */ }
    }
  };
}

/* Identity ----------------------------------------------------------------------------------- */

function identityTab(panel, s) {
  const { ctx, deviceId } = s;
  const cells = {};
  const dd = (name) => { cells[name] = h('span'); return cells[name]; };
  let shown = false;
  const keysArea = h('div', { class: 'keys' });
  const showKeys = h('button', { type: 'button', class: 'small', 'aria-pressed': 'false' }, 'Show keys');
  if (!s.canRead) needs(showKeys, false, 'RegistryRead');
  showKeys.addEventListener('click', () => {
    shown = !shown;
    showKeys.setAttribute('aria-pressed', String(shown));
    drawKeys(s.state.device);
  });

  function drawKeys(d) {
    const auth = d.authentication || {};
    if (auth.type === 'sas') {
      const pk = auth.symmetricKey?.primaryKey || '';
      const sk = auth.symmetricKey?.secondaryKey || '';
      const mask = (k) => (shown ? k : '•'.repeat(24));
      const pcs = deviceConnectionString(ctx, deviceId, pk);
      const scs = deviceConnectionString(ctx, deviceId, sk);
      const maybeNeeds = (b) => (s.canRead && !d.partial ? b : needs(b, false, 'RegistryRead'));
      fill(keysArea,
        h('div', { class: 'actions' }, showKeys),
        props([
          ['Primary key', h('code', { class: 'mono secret' }, mask(pk))],
          ['Secondary key', h('code', { class: 'mono secret' }, mask(sk))],
          ['Primary connection string', h('div', { class: 'secret-line' },
            h('code', { class: 'mono secret' }, shown ? pcs : deviceConnectionString(ctx, deviceId, mask(pk))),
            maybeNeeds(copyButton('Copy', pcs, 'Copy primary connection string')))],
          ['Secondary connection string', h('div', { class: 'secret-line' },
            h('code', { class: 'mono secret' }, shown ? scs : deviceConnectionString(ctx, deviceId, mask(sk))),
            maybeNeeds(copyButton('Copy', scs, 'Copy secondary connection string')))],
        ]));
    } else if (auth.type === 'selfSigned') {
      fill(keysArea, props([
        ['Primary thumbprint', h('code', { class: 'mono' }, auth.x509Thumbprint?.primaryThumbprint || '—')],
        ['Secondary thumbprint', h('code', { class: 'mono' }, auth.x509Thumbprint?.secondaryThumbprint || '—')],
      ]));
    } else {
      fill(keysArea, h('p', { class: 'hint' }, auth.type === 'certificateAuthority'
        ? 'The device authenticates with a certificate signed by a CA the hub trusts; it has no keys or thumbprints here.'
        : 'This device has no credentials.'));
    }
  }

  let lastKeys = null;
  function draw(d) {
    const set = (k, v) => { const t = v === undefined || v === null || v === '' ? '—' : String(v); if (cells[k].textContent !== t) cells[k].textContent = t; };
    set('generationId', d.generationId);
    set('etag', d.etag);
    set('status', d.status);
    set('statusReason', d.statusReason);
    set('statusUpdated', neverOr(d.statusUpdatedTime));
    set('connectionState', d.connectionState);
    set('connectionUpdated', neverOr(d.connectionStateUpdatedTime));
    set('lastActivity', neverOr(d.lastActivityTime));
    set('c2dCount', d.cloudToDeviceMessageCount ?? 0);
    set('auth', authName(d.authentication?.type));
    set('edge', d.capabilities?.iotEdge ? 'Yes' : 'No');
    const keys = JSON.stringify(d.authentication || {});
    if (keys !== lastKeys) { lastKeys = keys; drawKeys(d); }
  }

  panel.append(
    h('section', { class: 'card', 'aria-label': 'Identity' },
      h('h2', {}, 'Identity'),
      props([
        ['Device ID', h('span', { class: 'mono' }, deviceId)],
        ['Generation ID', dd('generationId')],
        ['ETag', h('span', { class: 'mono' }, dd('etag'))],
        ['Status', dd('status')],
        ['Status reason', dd('statusReason')],
        ['Status updated', dd('statusUpdated')],
        ['Connection state', dd('connectionState')],
        ['Connection state updated', dd('connectionUpdated')],
        ['Last activity', dd('lastActivity')],
        ['Cloud-to-device messages queued', dd('c2dCount')],
        ['Authentication', dd('auth')],
        ['IoT Edge', dd('edge')],
      ])),
    h('section', { class: 'card', 'aria-label': 'Credentials' }, h('h2', {}, 'Credentials'), keysArea));
  draw(s.state.device);
  s.onDevice(draw);
}

/* Twin --------------------------------------------------------------------------------------- */

function twinTab(panel, s) {
  const { ctx, deviceId } = s;
  const twinPath = `/twins/${enc(deviceId)}`;
  const box = h('div', { class: 'twin-notices' });
  const tags = jsonField('Tags', 'Service-only tags, a JSON object. Removing a key deletes it.', 8);
  const desired = jsonField('Desired properties', 'A JSON object; $metadata and $version are left out. Removing a key deletes it.', 12);
  const reported = h('pre', { class: 'mono reported', tabindex: '0', 'aria-label': 'Reported properties' });
  const reportedMeta = h('pre', { class: 'mono' });
  const facts = h('div', { class: 'twin-facts' });
  const save = needs(h('button', { type: 'button', class: 'primary' }, 'Save twin'), s.canService, 'ServiceConnect');
  const refresh = needs(h('button', { type: 'button' }, 'Refresh'), s.canService, 'ServiceConnect');
  const loadBox = notice();
  for (const f of [tags, desired]) if (!s.canService) f.ta.readOnly = true;

  let twin = null; // the twin the editors started from
  let original = null; // {tags, desired} as loaded

  function showTwin(t) {
    twin = t;
    original = { tags: t.tags || {}, desired: userProps(t.properties?.desired) };
    tags.ta.value = pretty(original.tags);
    desired.ta.value = pretty(original.desired);
    tags.clear();
    desired.clear();
    const rep = t.properties?.reported || {};
    reported.textContent = pretty(userProps(rep));
    reportedMeta.textContent = pretty(rep.$metadata || {});
    fill(facts, props([
      ['Twin version', String(t.version ?? '—')],
      ['ETag', h('span', { class: 'mono' }, t.etag || '—')],
      ['Desired version', String(t.properties?.desired?.$version ?? '—')],
      ['Reported version', String(rep.$version ?? '—')],
      ['Model ID', t.modelId || '—'],
    ]));
  }

  async function load() {
    loadBox.clear();
    try {
      showTwin(await ctx.api.get(twinPath));
    } catch (e) {
      loadBox.show('error', describe(e));
    }
  }

  /** Reads both editors; throws (showing the error by the field) when either is not an object. */
  function edited() {
    return { tags: tags.read(), desired: desired.read() };
  }

  function patchBody(from, to) {
    const body = {};
    const tp = mergePatch(from.tags, to.tags);
    const dp = mergePatch(from.desired, to.desired);
    if (tp !== undefined) body.tags = tp;
    if (dp !== undefined) body.properties = { desired: dp };
    return Object.keys(body).length ? body : null;
  }

  async function send(body, etag) {
    const t = await ctx.api.patch(twinPath, body, { headers: { 'If-Match': `"${etag}"` } });
    showTwin(t);
    fill(box, richNotice('ok', `Saved: the twin is now version ${t.version}${t.properties?.desired?.$version !== undefined ? `, desired version ${t.properties.desired.$version}` : ''}.`));
  }

  function conflict(etag) {
    const reload = h('button', { type: 'button' }, 'Reload twin');
    const apply = h('button', { type: 'button', class: 'primary' }, 'Apply my changes to the latest');
    const own = notice();
    reload.addEventListener('click', () => busy(reload, own, async () => {
      showTwin(await ctx.api.get(twinPath));
      fill(box, richNotice('info', `Reloaded: twin version ${twin.version}. Your edits were discarded.`));
      desired.ta.focus();
    }));
    apply.addEventListener('click', () => busy(apply, own, async () => {
      const mine = patchBody(original, edited());
      const latest = await ctx.api.get(twinPath);
      const latestParts = { tags: latest.tags || {}, desired: userProps(latest.properties?.desired) };
      // Your changes (what you edited since loading) on top of the newest twin; keys you did
      // not touch keep the values the other writer gave them.
      const target = {
        tags: mine?.tags !== undefined ? applyPatch(latestParts.tags, mine.tags) : latestParts.tags,
        desired: mine?.properties ? applyPatch(latestParts.desired, mine.properties.desired) : latestParts.desired,
      };
      const body = patchBody(latestParts, target);
      if (!body) {
        showTwin(latest);
        fill(box, richNotice('info', `The latest twin (version ${latest.version}) already has your changes.`));
        return;
      }
      try {
        await send(body, latest.etag);
      } catch (e) {
        if (e instanceof ApiError && e.status === 412) { conflict(latest.etag); return; }
        throw e;
      }
    }));
    fill(box, richNotice('warn',
      h('p', {}, `The twin changed since you loaded it (etag ${etag}); it was not saved. `
        + 'Reload it to see the newest twin and lose your edits, or apply the keys you changed on top of the newest twin.'),
      h('div', { class: 'actions' }, reload, apply),
      own));
  }

  save.addEventListener('click', () => busy(save, null, async () => {
    box.replaceChildren();
    if (!twin) { fill(box, richNotice('error', 'The twin is not loaded yet.')); return; }
    let values;
    try { values = edited(); } catch { return; }
    const body = patchBody(original, values);
    if (!body) { fill(box, richNotice('info', 'Nothing to save: tags and desired properties are unchanged.')); return; }
    try {
      await send(body, twin.etag);
    } catch (e) {
      if (e instanceof ApiError && e.status === 412) conflict(twin.etag);
      else fill(box, richNotice('error', describe(e)));
    }
  }).catch((e) => fill(box, richNotice('error', describe(e)))));
  refresh.addEventListener('click', () => busy(refresh, loadBox, async () => {
    box.replaceChildren();
    await load();
  }));

  panel.append(
    h('section', { class: 'card', 'aria-label': 'Twin' },
      h('div', { class: 'section-head' }, h('h2', {}, 'Twin'), h('div', { class: 'actions' }, refresh)),
      loadBox,
      facts,
      h('div', { class: 'grid twin-grid' },
        h('div', {}, tags.wrap, desired.wrap,
          h('div', { class: 'actions' }, save),
          box),
        h('div', {},
          h('h3', { class: 'label-like' }, 'Reported properties (read-only)'),
          reported,
          h('details', {}, h('summary', {}, 'Reported $metadata'), reportedMeta)))));
  if (s.canService) load();
  else loadBox.show('error', 'Reading and writing twins needs ServiceConnect, which your policy does not grant.');
}

/* Direct method ------------------------------------------------------------------------------ */

function methodTab(panel, s) {
  const { ctx, deviceId } = s;
  const name = h('input', { name: 'methodName', required: true, autocomplete: 'off', spellcheck: 'false' });
  const payload = jsonField('Payload', 'Any JSON value: the device receives it as the method\'s payload.', 6);
  payload.ta.value = '{}';
  const responseTimeout = h('input', { type: 'number', min: 5, max: 300, step: 1, value: '30', name: 'responseTimeoutInSeconds' });
  const connectTimeout = h('input', { type: 'number', min: 0, max: 300, step: 1, value: '0', name: 'connectTimeoutInSeconds' });
  const invoke = needs(h('button', { type: 'submit', class: 'primary' }, 'Invoke method'), s.canService, 'ServiceConnect');
  const box = notice();
  const result = h('section', { class: 'card method-result', role: 'region', 'aria-label': 'Method result', 'aria-live': 'polite' },
    h('h2', {}, 'Result'), h('p', { class: 'hint' }, 'No method invoked yet.'));
  const form = h('form', { class: 'card', 'aria-labelledby': 'method-h' },
    h('h2', { id: 'method-h' }, `Invoke a direct method on ${deviceId}`),
    field('Method name', name),
    payload.wrap,
    h('div', { class: 'row' },
      field('Response timeout (s)', responseTimeout, '5 to 300: how long the hub waits for the answer.'),
      field('Connect timeout (s)', connectTimeout, '0 to 300: how long the hub waits for an offline device to connect.')),
    box,
    h('div', { class: 'actions' }, invoke));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    box.clear();
    const methodName = name.value.trim();
    if (!methodName) { box.show('error', 'Method name is required.'); name.focus(); return; }
    let body;
    try {
      body = {
        methodName,
        payload: payload.read(false),
        responseTimeoutInSeconds: Number(responseTimeout.value || 30),
        connectTimeoutInSeconds: Number(connectTimeout.value || 0),
      };
    } catch { return; }
    const wait = body.responseTimeoutInSeconds + body.connectTimeoutInSeconds;
    fill(result, h('h2', {}, 'Result'), h('p', { class: 'loading' }, `Waiting for ${deviceId} to answer ${methodName} (up to ${wait} s)…`));
    const started = performance.now();
    await busy(invoke, null, async () => {
      try {
        const answer = await ctx.api.post(`/twins/${enc(deviceId)}/methods`, body);
        const ms = Math.round(performance.now() - started);
        fill(result, h('h2', {}, 'Result'),
          h('p', { class: 'method-status' },
            h('strong', {}, `Status ${answer?.status}`), ` · ${methodName} · round trip ${ms} ms`),
          h('pre', { class: 'mono', tabindex: '0' }, pretty(answer?.payload ?? null)));
      } catch (e) {
        const ms = Math.round(performance.now() - started);
        fill(result, h('h2', {}, 'Result'),
          richNotice('error', `${describe(e)} (after ${ms} ms)`));
      }
    });
  });
  panel.append(form, result);
}

/* Cloud-to-device ---------------------------------------------------------------------------- */

function c2dTab(panel, s) {
  const { ctx, deviceId } = s;
  const body = h('textarea', { class: 'code small-code', rows: 5, spellcheck: 'false', name: 'body' });
  const properties = jsonField('Properties (JSON object of strings)', 'Application properties, e.g. {"kind": "alert"}.', 4);
  properties.ta.value = '{}';
  const messageId = h('input', { name: 'messageId', autocomplete: 'off', spellcheck: 'false' });
  const ack = h('select', { name: 'ack' },
    h('option', { value: 'none' }, 'none'),
    h('option', { value: 'positive' }, 'positive'),
    h('option', { value: 'negative' }, 'negative'),
    h('option', { value: 'full' }, 'full'));
  const ttl = h('input', { type: 'number', min: 1, step: 1, name: 'ttlSeconds' });
  const send = needs(h('button', { type: 'submit', class: 'primary' }, 'Send message'), s.canService, 'ServiceConnect');
  const purge = needs(h('button', { type: 'button', class: 'danger' }, 'Purge queue'), s.canService, 'ServiceConnect');
  const box = notice();
  const purgeBox = notice();
  const queued = h('span');
  s.onDevice((d) => { const t = String(d.cloudToDeviceMessageCount ?? 0); if (queued.textContent !== t) queued.textContent = t; });
  queued.textContent = String(s.state.device.cloudToDeviceMessageCount ?? 0);

  const form = h('form', { class: 'card', 'aria-labelledby': 'c2d-h' },
    h('h2', { id: 'c2d-h' }, `Send a cloud-to-device message to ${deviceId}`),
    field('Message body', body, 'Sent as UTF-8 text.'),
    properties.wrap,
    h('div', { class: 'row' },
      field('Message ID', messageId, 'Optional.'),
      field('Acknowledgement', ack, 'Feedback the hub reports when the device completes or rejects it.'),
      field('Time to live (s)', ttl, 'Optional; the hub\'s default when empty.')),
    box,
    h('div', { class: 'actions' }, send));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    box.clear();
    let props;
    try {
      props = properties.read();
      const bad = Object.entries(props).find(([, v]) => typeof v !== 'string');
      if (bad) {
        properties.ta.setAttribute('aria-invalid', 'true');
        box.show('error', `Properties must all be strings; "${bad[0]}" is ${JSON.stringify(bad[1])}.`);
        properties.ta.focus();
        return;
      }
    } catch { return; }
    const msg = { body: body.value, properties: props, ack: ack.value };
    if (messageId.value.trim()) msg.messageId = messageId.value.trim();
    if (ttl.value) {
      const n = Number(ttl.value);
      if (!Number.isInteger(n) || n < 1) { box.show('error', 'Time to live must be a whole number of seconds, at least 1.'); ttl.focus(); return; }
      msg.ttlSeconds = n;
    }
    await busy(send, box, async () => {
      const sent = await ctx.api.post(`/twinhub/devices/${enc(deviceId)}/messages`, msg);
      box.show('ok', `Queued for ${deviceId}: sequence number ${sent.sequenceNumber}${sent.messageId ? `, message ID ${sent.messageId}` : ''}.`);
    });
  });
  purge.addEventListener('click', () => busy(purge, purgeBox, async () => {
    purgeBox.clear();
    const r = await ctx.api.del(`/devices/${enc(deviceId)}/commands`);
    const n = r?.totalMessagesPurged ?? 0;
    purgeBox.show('ok', `Purged ${n} message${n === 1 ? '' : 's'} from ${deviceId}'s queue.`);
  }));
  panel.append(form,
    h('section', { class: 'card', 'aria-label': 'Queue' },
      h('h2', {}, 'Queue'),
      h('p', {}, 'Messages waiting for the device: ', queued),
      h('div', { class: 'actions' }, purge),
      purgeBox));
}

/* Telemetry ---------------------------------------------------------------------------------- */

function telemetryTab(panel, s) {
  const { ctx, deviceId } = s;
  const from = h('select', { name: 'from' },
    h('option', { value: 'latest' }, 'Now'),
    h('option', { value: 'earliest' }, 'Earliest retained'));
  const pause = needs(h('button', { type: 'button', 'aria-pressed': 'false' }, 'Pause'), s.canService, 'ServiceConnect');
  const clear = h('button', { type: 'button' }, 'Clear');
  const stateLine = h('span', { class: 'stream-state', role: 'status' });
  const count = h('span', { class: 'hint' });
  const list = h('div', { class: 'events', role: 'log', 'aria-label': 'Live telemetry', 'aria-live': 'off', tabindex: '0' });
  const empty = h('p', { class: 'empty' }, 'No messages yet.');
  list.append(empty);
  if (!s.canService) needs(from, false, 'ServiceConnect');

  let controller = null;
  let paused = false;
  let visible = false;
  let cursor = null; // "<partition>:<sequence>" of the newest event shown
  let received = 0;

  function setState(text, kind = '') {
    stateLine.textContent = text;
    stateLine.className = `stream-state ${kind}`;
  }

  function entry(ev) {
    let bodyNode;
    if (ev.body !== undefined && ev.body !== null) {
      let parsed;
      try { parsed = JSON.parse(ev.body); } catch { parsed = undefined; }
      bodyNode = h('pre', { class: 'mono' }, parsed !== undefined && typeof parsed === 'object' ? pretty(parsed) : ev.body);
    } else if (ev.bodyBase64 !== undefined && ev.bodyBase64 !== null) {
      bodyNode = h('div', {}, h('p', { class: 'hint' }, 'The body is not UTF-8; base64:'), h('pre', { class: 'mono' }, ev.bodyBase64));
    } else {
      bodyNode = h('p', { class: 'hint' }, 'Empty body.');
    }
    const app = ev.properties || {};
    const sys = ev.systemProperties || {};
    return h('article', { class: 'event' },
      h('div', { class: 'meta' },
        h('time', { datetime: ev.enqueuedTime }, time(ev.enqueuedTime) || ev.enqueuedTime || ''),
        ev.moduleId ? h('span', {}, `module ${ev.moduleId}`) : null,
        h('span', {}, `partition ${ev.partition} · sequence ${ev.sequenceNumber}`)),
      bodyNode,
      Object.keys(app).length
        ? h('div', { class: 'event-props' }, h('span', { class: 'hint' }, 'Properties: '),
          Object.entries(app).map(([k, v]) => h('code', { class: 'prop' }, `${k}=${v ?? ''}`)))
        : null,
      h('details', {}, h('summary', {}, 'System properties'), h('pre', { class: 'mono' }, pretty(sys))));
  }

  function onEvent(ev) {
    cursor = `${ev.partition}:${ev.sequenceNumber}`;
    received += 1;
    empty.remove();
    list.prepend(entry(ev));
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
    count.textContent = `${received} received · ${list.childElementCount} shown (newest first, at most ${MAX_EVENTS})`;
  }

  function stop() {
    if (controller) controller.abort();
    controller = null;
  }

  function start(fromValue) {
    stop();
    if (!s.canService) { setState('Telemetry needs ServiceConnect, which your policy does not grant.', 'error'); return; }
    const mine = new AbortController();
    controller = mine;
    setState('Connecting…');
    let lastError = null;
    ctx.api.stream({
      deviceId,
      from: fromValue,
      signal: mine.signal,
      onEvent,
      onState: (st, err) => {
        if (mine.signal.aborted) return;
        if (st === 'open') { lastError = null; setState(`Listening… (from ${from.selectedOptions[0].textContent.toLowerCase()})`, 'ok'); }
        else { lastError = err; setState(`Reconnecting: ${describe(err)}`, 'warn'); }
      },
    }).then(() => {
      if (mine.signal.aborted || controller !== mine) return;
      controller = null;
      setState(`Stopped: ${lastError ? describe(lastError) : 'the stream ended'}`, 'error');
    }, (e) => {
      if (mine.signal.aborted || controller !== mine) return;
      controller = null;
      setState(`Stopped: ${describe(e)}`, 'error');
    });
  }

  function resume() {
    // After a pause, pick up right after the last message shown; otherwise from the choice.
    start(cursor || from.value);
  }

  from.addEventListener('change', () => {
    cursor = null;
    if (!paused && visible) start(from.value);
  });
  pause.addEventListener('click', () => {
    paused = !paused;
    pause.textContent = paused ? 'Resume' : 'Pause';
    pause.setAttribute('aria-pressed', String(paused));
    if (paused) { stop(); setState('Paused'); } else if (visible) resume();
  });
  clear.addEventListener('click', () => {
    list.replaceChildren(empty);
    received = 0;
    count.textContent = '';
  });

  panel.append(h('section', { class: 'card', 'aria-label': 'Telemetry' },
    h('h2', {}, `Telemetry from ${deviceId}`),
    h('div', { class: 'row telemetry-controls' },
      field('From', from),
      h('div', { class: 'actions field' }, pause, clear)),
    h('p', {}, stateLine, ' ', count),
    list));

  return {
    show() { visible = true; if (!paused) resume(); },
    hide() { visible = false; stop(); if (!paused) setState('Stopped while the tab is hidden'); },
    dispose() { visible = false; stop(); },
  };
}

/* Modules ------------------------------------------------------------------------------------ */

function modulesTab(panel, s) {
  const { ctx, deviceId } = s;
  const base = `/devices/${enc(deviceId)}/modules`;
  const box = notice();
  const listArea = h('div');
  const twinArea = h('div');
  const moduleInput = h('input', { name: 'moduleId', required: true, autocomplete: 'off', spellcheck: 'false', maxlength: 128 });
  const create = needs(h('button', { type: 'submit', class: 'primary' }, 'Create module'), s.canWrite, 'RegistryWrite');
  const createBox = notice();
  const form = h('form', { class: 'row inline-form' }, field('Module ID', moduleInput), h('div', { class: 'field' }, create));

  async function load() {
    try {
      const modules = await ctx.api.get(base);
      draw(modules || []);
    } catch (e) {
      box.show('error', describe(e));
    }
  }

  function draw(modules) {
    if (modules.length === 0) {
      fill(listArea, h('p', { class: 'empty' }, `${deviceId} has no modules.`));
      return;
    }
    fill(listArea, h('div', { class: 'table-wrap' }, h('table', {},
      h('caption', { class: 'visually-hidden' }, `Modules of ${deviceId}`),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Module ID'), h('th', { scope: 'col' }, 'Connection'),
        h('th', { scope: 'col' }, 'Last activity'), h('th', { scope: 'col' }, 'Authentication'),
        h('th', { scope: 'col' }, 'Actions'))),
      h('tbody', {}, modules.map(moduleRow)))));
  }

  function moduleRow(m) {
    const mid = m.moduleId;
    const key = m.authentication?.symmetricKey?.primaryKey;
    const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete module ${mid}` }, 'Delete'), s.canWrite, 'RegistryWrite');
    del.addEventListener('click', () => busy(del, box, async () => {
      box.clear();
      if (!window.confirm(`Delete module ${mid} of ${deviceId}?`)) return;
      await ctx.api.del(`${base}/${enc(mid)}`, { headers: { 'If-Match': '*' } });
      box.show('ok', `Deleted module ${mid}.`);
      twinArea.replaceChildren();
      await load();
    }));
    const twinButton = needs(h('button', { type: 'button', class: 'small', 'aria-label': `Show twin of module ${mid}` }, 'Twin'), s.canService, 'ServiceConnect');
    twinButton.addEventListener('click', () => busy(twinButton, box, () => showModuleTwin(mid)));
    return h('tr', {},
      h('th', { scope: 'row', class: 'device-id' }, mid),
      h('td', {}, connectionPill(m.connectionState)),
      h('td', { class: 'nowrap' }, neverOr(m.lastActivityTime)),
      h('td', {}, authName(m.authentication?.type)),
      h('td', {}, h('div', { class: 'actions row-actions' },
        m.authentication?.type === 'sas' && key
          ? copyButton('Copy connection string', deviceConnectionString(ctx, deviceId, key, mid), `Copy connection string of module ${mid}`)
          : null,
        twinButton, del)));
  }

  async function showModuleTwin(mid) {
    box.clear();
    const t = await ctx.api.get(`/twins/${enc(deviceId)}/modules/${enc(mid)}`);
    const close = h('button', { type: 'button', class: 'small' }, 'Close');
    close.addEventListener('click', () => {
      twinArea.replaceChildren();
      history.replaceState(null, '', `#/devices/${enc(deviceId)}/modules`);
    });
    fill(twinArea, h('section', { class: 'card', 'aria-label': `Twin of module ${mid}` },
      h('div', { class: 'section-head' }, h('h2', {}, `Twin of module ${mid}`), h('div', { class: 'actions' }, close)),
      props([['Version', String(t.version ?? '—')], ['ETag', h('span', { class: 'mono' }, t.etag || '—')]]),
      h('div', { class: 'grid' },
        h('div', {}, h('h3', { class: 'label-like' }, 'Tags'), h('pre', { class: 'mono', tabindex: '0' }, pretty(t.tags || {}))),
        h('div', {}, h('h3', { class: 'label-like' }, 'Desired properties'), h('pre', { class: 'mono', tabindex: '0' }, pretty(userProps(t.properties?.desired)))),
        h('div', {}, h('h3', { class: 'label-like' }, 'Reported properties'), h('pre', { class: 'mono', tabindex: '0' }, pretty(userProps(t.properties?.reported)))))));
    history.replaceState(null, '', `#/devices/${enc(deviceId)}/modules/${enc(mid)}`);
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    createBox.clear();
    const mid = moduleInput.value.trim();
    if (!mid) { createBox.show('error', 'Module ID is required.'); moduleInput.focus(); return; }
    await busy(create, createBox, async () => {
      await ctx.api.put(`${base}/${enc(mid)}`, {
        moduleId: mid,
        deviceId,
        authentication: { type: 'sas', symmetricKey: { primaryKey: randomKey(), secondaryKey: randomKey() } },
      });
      createBox.show('ok', `Created module ${mid}.`);
      moduleInput.value = '';
      await load();
    });
  });

  panel.append(
    h('section', { class: 'card', 'aria-label': 'Modules' },
      h('h2', {}, `Modules of ${deviceId}`),
      box,
      listArea,
      form,
      createBox),
    twinArea);
  if (s.canRead) {
    load().then(() => {
      if (s.params.moduleId && s.canService) showModuleTwin(s.params.moduleId).catch((e) => box.show('error', describe(e)));
    });
  } else {
    box.show('error', 'Listing modules needs RegistryRead, which your policy does not grant.');
  }
}
