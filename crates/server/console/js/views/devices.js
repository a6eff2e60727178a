// The device list: IoT Hub's query box with continuation-token paging, a table whose status and
// connection pills are refreshed in place every 2 s (one `deviceId IN [...]` query for the page
// on screen), create, enable/disable, delete, and copying a SAS device's connection string.
//
// Also exports the few helpers the device view shares (connection strings, enable/disable).

import { randomKey } from '../sas.js';
import {
  h, fill, field, notice, busy, describe, copyButton, needs, pill, heading, section, time, pretty,
} from '../ui.js';

const PAGE_SIZE = 50;
const LIVE_MS = 2000;
const DEFAULT_QUERY = 'SELECT * FROM devices';

/** A device (or module) connection string: device strings carry the host only, never a port. */
export function deviceConnectionString(ctx, deviceId, key, moduleId) {
  let s = `HostName=${ctx.facts.hostName};DeviceId=${deviceId}`;
  if (moduleId) s += `;ModuleId=${moduleId}`;
  return `${s};SharedAccessKey=${key}`;
}

export function statusPill(status) {
  const enabled = String(status || '').toLowerCase() !== 'disabled';
  return pill(enabled ? 'Enabled' : 'Disabled', enabled ? 'enabled' : 'disabled');
}

export function connectionPill(state) {
  const connected = state === 'Connected';
  return pill(connected ? 'Connected' : 'Disconnected', connected ? 'connected' : 'disconnected');
}

/** Rewrites a pill made by statusPill/connectionPill in place (no node swap, focus stays). */
export function setPill(el, text) {
  if (el.textContent !== text) {
    el.textContent = text;
    el.className = `pill ${text.toLowerCase()}`;
  }
}

/** Enables or disables a device: its current identity with `status` changed, If-Match: *. */
export async function setDeviceStatus(ctx, deviceId, status) {
  const path = `/devices/${encodeURIComponent(deviceId)}`;
  const device = await ctx.api.get(path);
  const body = { ...device, status };
  delete body.etag;
  return ctx.api.put(path, body, { headers: { 'If-Match': '*' } });
}

/** Deletes a device after asking; resolves true when deleted. */
export async function deleteDevice(ctx, deviceId) {
  if (!window.confirm(`Delete device ${deviceId}? Its identity, twin and modules are removed; this cannot be undone.`)) {
    return false;
  }
  await ctx.api.del(`/devices/${encodeURIComponent(deviceId)}`, { headers: { 'If-Match': '*' } });
  return true;
}

function quote(id) {
  return `'${String(id).replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

function authName(type) {
  return {
    sas: 'Symmetric key', selfSigned: 'X.509 self-signed', certificateAuthority: 'X.509 CA signed', none: 'None',
  }[type] || type || '';
}

function createForm(ctx, onCreated) {
  const box = notice();
  const idInput = h('input', {
    name: 'deviceId', required: true, autocomplete: 'off', spellcheck: 'false', maxlength: 128,
  });
  const auth = h('select', { name: 'authentication' },
    h('option', { value: 'sas' }, 'Symmetric key (keys generated)'),
    h('option', { value: 'selfSigned' }, 'X.509 self-signed (thumbprints)'),
    h('option', { value: 'certificateAuthority' }, 'X.509 CA signed'));
  const primary = h('input', { name: 'primaryThumbprint', autocomplete: 'off', spellcheck: 'false' });
  const secondary = h('input', { name: 'secondaryThumbprint', autocomplete: 'off', spellcheck: 'false' });
  const thumbs = h('div', { class: 'row', hidden: true },
    field('Primary thumbprint', primary, 'SHA-1 or SHA-256 of the device certificate, hex.'),
    field('Secondary thumbprint', secondary));
  auth.addEventListener('change', () => {
    thumbs.hidden = auth.value !== 'selfSigned';
    primary.required = auth.value === 'selfSigned';
  });
  const enabled = h('input', { type: 'checkbox', name: 'enabled', checked: true });
  const create = needs(h('button', { type: 'submit', class: 'primary' }, 'Create'), ctx.can('RegistryWrite'), 'RegistryWrite');
  const result = h('div', { class: 'created' });
  const form = h('form', { class: 'card device-create', 'aria-label': 'New device' },
    h('h2', {}, 'New device'),
    h('div', { class: 'row' },
      field('Device ID', idInput, 'Up to 128 characters: letters, digits and -.%_*?!(),:=@$\''),
      field('Authentication', auth)),
    thumbs,
    h('div', { class: 'field' }, h('label', { class: 'check' }, enabled, ' Enabled')),
    box,
    h('div', { class: 'actions' }, create),
    result);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    box.clear();
    result.replaceChildren();
    const id = idInput.value.trim();
    if (!id) { box.show('error', 'Device ID is required.'); idInput.focus(); return; }
    const body = {
      deviceId: id,
      status: enabled.checked ? 'enabled' : 'disabled',
      capabilities: { iotEdge: false },
    };
    if (auth.value === 'sas') {
      body.authentication = { type: 'sas', symmetricKey: { primaryKey: randomKey(), secondaryKey: randomKey() } };
    } else if (auth.value === 'selfSigned') {
      if (!primary.value.trim()) { box.show('error', 'Primary thumbprint is required for X.509 self-signed devices.'); primary.focus(); return; }
      body.authentication = {
        type: 'selfSigned',
        x509Thumbprint: { primaryThumbprint: primary.value.trim(), secondaryThumbprint: secondary.value.trim() || null },
      };
    } else {
      body.authentication = { type: 'certificateAuthority' };
    }
    await busy(create, box, async () => {
      const device = await ctx.api.put(`/devices/${encodeURIComponent(id)}`, body);
      const key = device?.authentication?.symmetricKey?.primaryKey;
      const children = [h('p', {}, 'Created device ', h('a', { href: `#/devices/${encodeURIComponent(id)}` }, id), '.')];
      if (device?.authentication?.type === 'sas' && key) {
        const cs = deviceConnectionString(ctx, id, key);
        children.push(h('p', {}, 'Its connection string (primary key):'),
          h('div', { class: 'secret-line' }, h('code', { class: 'mono' }, cs),
            copyButton('Copy', cs, `Copy connection string of ${id}`)));
      }
      fill(result, h('div', { class: 'notice ok', role: 'status' }, children));
      idInput.value = '';
      primary.value = '';
      secondary.value = '';
      onCreated();
    });
  });
  form.focusFirst = () => idInput.focus();
  return form;
}

export function render(main, ctx) {
  const canList = ctx.can('RegistryRead') || ctx.can('ServiceConnect');
  const canWrite = ctx.can('RegistryWrite');
  const box = notice();
  const liveState = h('span', { class: 'live-state hint', 'aria-live': 'off' });

  const queryText = h('textarea', {
    name: 'query', rows: 3, class: 'code query', spellcheck: 'false', autocomplete: 'off',
  });
  queryText.value = DEFAULT_QUERY;
  const run = h('button', { type: 'submit', class: 'primary' }, 'Run query');
  const prev = h('button', { type: 'button', disabled: true }, 'Previous page');
  const next = h('button', { type: 'button', disabled: true }, 'Next page');
  const pageInfo = h('span', { class: 'hint', 'aria-live': 'polite' });
  const queryForm = h('form', { class: 'card' },
    field('Query', queryText, 'IoT Hub query language, e.g. SELECT * FROM devices WHERE status = \'disabled\'. Ctrl+Enter runs it.'),
    h('div', { class: 'actions' }, needs(run, canList, 'RegistryRead or ServiceConnect'), prev, next, pageInfo, liveState));
  const tableArea = h('div', { class: 'device-table' });

  const createArea = h('div');
  const newButton = needs(h('button', { type: 'button', class: 'primary', 'aria-expanded': 'false' }, 'New device'), canWrite, 'RegistryWrite');

  // Paging: tokens[i] is the continuation that fetches page i (null for the first).
  let sql = DEFAULT_QUERY;
  let tokens = [null];
  let pageIndex = 0;
  let nextToken = null;
  let rows = new Map(); // deviceId -> {statusPill, connPill, activity, toggle, copyCell, row}
  let timer = null;
  let polling = false;
  let loadSeq = 0;
  let stopped = false;

  async function load() {
    const mine = ++loadSeq;
    box.clear();
    run.setAttribute('aria-busy', 'true');
    prev.disabled = true;
    next.disabled = true;
    try {
      const page = await ctx.api.query(sql, { continuation: tokens[pageIndex], pageSize: PAGE_SIZE });
      if (mine !== loadSeq || stopped) return;
      nextToken = page.continuation;
      showRows(page.items || []);
      pageInfo.textContent = `Page ${pageIndex + 1} · ${page.items.length} item${page.items.length === 1 ? '' : 's'}${nextToken ? ' · more' : ''}`;
    } catch (e) {
      if (mine !== loadSeq || stopped) return;
      box.show('error', describe(e));
      nextToken = null;
    } finally {
      if (mine === loadSeq) {
        run.removeAttribute('aria-busy');
        prev.disabled = pageIndex === 0;
        next.disabled = !nextToken;
      }
    }
  }

  function showRows(items) {
    rows = new Map();
    const devices = items.filter((it) => it && typeof it === 'object' && typeof it.deviceId === 'string' && !it.moduleId);
    if (items.length === 0) {
      fill(tableArea, h('p', { class: 'empty card' }, 'No devices match this query.'));
      return;
    }
    if (devices.length !== items.length) {
      // A projection without device ids (COUNT(), GROUP BY, module rows...): show it as JSON.
      fill(tableArea, section('Query result', h('pre', { class: 'mono', tabindex: '0' }, pretty(items))));
      return;
    }
    const tbody = h('tbody', {}, devices.map(deviceRow));
    fill(tableArea, h('div', { class: 'table-wrap' }, h('table', { class: 'devices' },
      h('caption', { class: 'visually-hidden' }, 'Devices'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Device ID'),
        h('th', { scope: 'col' }, 'Status'),
        h('th', { scope: 'col' }, 'Connection'),
        h('th', { scope: 'col' }, 'Last activity'),
        h('th', { scope: 'col' }, 'Authentication'),
        h('th', { scope: 'col' }, h('span', {}, 'Actions')))),
      tbody)));
  }

  function deviceRow(item) {
    const id = item.deviceId;
    const statusEl = statusPill(item.status);
    const connEl = connectionPill(item.connectionState);
    const activity = h('td', { class: 'nowrap' }, time(item.lastActivityTime) || 'Never');
    const authCell = h('td', {}, authName(item.authenticationType));
    const disabled = String(item.status || '').toLowerCase() === 'disabled';
    const toggle = needs(h('button', {
      type: 'button', class: 'small', 'aria-label': `${disabled ? 'Enable' : 'Disable'} ${id}`,
    }, disabled ? 'Enable' : 'Disable'), canWrite, 'RegistryWrite');
    toggle.dataset.status = disabled ? 'disabled' : 'enabled';
    toggle.addEventListener('click', () => busy(toggle, box, async () => {
      box.clear();
      const wanted = toggle.dataset.status === 'disabled' ? 'enabled' : 'disabled';
      const device = await setDeviceStatus(ctx, id, wanted);
      updateRow(id, { status: device.status });
    }));
    const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete ${id}` }, 'Delete'), canWrite, 'RegistryWrite');
    del.addEventListener('click', () => busy(del, box, async () => {
      box.clear();
      if (await deleteDevice(ctx, id)) {
        box.show('ok', `Deleted device ${id}.`);
        await load();
      }
    }));
    const copyCell = h('span', { class: 'copy-slot' });
    const entry = { statusEl, connEl, activity, toggle, copyCell, authCell, auth: item.authenticationType };
    rows.set(id, entry);
    setCopy(entry, id);
    return h('tr', { dataset: { deviceId: id } },
      h('th', { scope: 'row', class: 'device-id' }, h('a', { href: `#/devices/${encodeURIComponent(id)}` }, id)),
      h('td', {}, statusEl),
      h('td', {}, connEl),
      activity,
      authCell,
      h('td', {}, h('div', { class: 'actions row-actions' }, copyCell, toggle, del)));
  }

  function setCopy(entry, id) {
    if (entry.auth !== 'sas' || entry.copyCell.firstChild) return;
    const b = copyButton('Copy connection string', async () => {
      const device = await ctx.api.get(`/devices/${encodeURIComponent(id)}`);
      return deviceConnectionString(ctx, id, device.authentication?.symmetricKey?.primaryKey || '');
    }, `Copy connection string of ${id}`);
    if (!ctx.can('RegistryRead')) needs(b, false, 'RegistryRead');
    entry.copyCell.append(b);
  }

  function updateRow(id, item) {
    const entry = rows.get(id);
    if (!entry) return;
    if (item.status !== undefined) {
      const disabled = String(item.status).toLowerCase() === 'disabled';
      setPill(entry.statusEl, disabled ? 'Disabled' : 'Enabled');
      const label = disabled ? 'Enable' : 'Disable';
      if (entry.toggle.textContent !== label) {
        entry.toggle.textContent = label;
        entry.toggle.setAttribute('aria-label', `${label} ${id}`);
        entry.toggle.dataset.status = disabled ? 'disabled' : 'enabled';
      }
    }
    if (item.connectionState !== undefined) {
      setPill(entry.connEl, item.connectionState === 'Connected' ? 'Connected' : 'Disconnected');
    }
    if (item.lastActivityTime !== undefined) {
      const text = time(item.lastActivityTime) || 'Never';
      if (entry.activity.textContent !== text) entry.activity.textContent = text;
    }
    if (item.authenticationType !== undefined && entry.auth !== item.authenticationType) {
      entry.auth = item.authenticationType;
      entry.authCell.textContent = authName(entry.auth);
      setCopy(entry, id);
    }
  }

  async function poll() {
    if (polling || stopped || rows.size === 0 || document.hidden) return;
    polling = true;
    const seq = loadSeq;
    try {
      const ids = [...rows.keys()];
      const page = await ctx.api.query(
        `SELECT deviceId, status, connectionState, lastActivityTime, authenticationType FROM devices WHERE deviceId IN [${ids.map(quote).join(', ')}]`,
        { pageSize: ids.length + 1 });
      if (stopped || seq !== loadSeq) return;
      for (const item of page.items || []) updateRow(item.deviceId, item);
      liveState.textContent = `Live · updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
    } catch (e) {
      if (!stopped) liveState.textContent = `Live update failed: ${describe(e)}`;
    } finally {
      polling = false;
    }
  }

  queryForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    sql = queryText.value.trim() || DEFAULT_QUERY;
    tokens = [null];
    pageIndex = 0;
    load();
  });
  queryText.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); queryForm.requestSubmit(); }
  });
  next.addEventListener('click', () => {
    if (!nextToken) return;
    tokens = tokens.slice(0, pageIndex + 1);
    tokens.push(nextToken);
    pageIndex += 1;
    load();
  });
  prev.addEventListener('click', () => {
    if (pageIndex === 0) return;
    pageIndex -= 1;
    tokens = tokens.slice(0, pageIndex + 1);
    load();
  });
  newButton.addEventListener('click', () => {
    if (createArea.firstChild) {
      createArea.replaceChildren();
      newButton.setAttribute('aria-expanded', 'false');
      return;
    }
    const form = createForm(ctx, () => load());
    createArea.append(form);
    newButton.setAttribute('aria-expanded', 'true');
    form.focusFirst();
  });

  main.append(heading('Devices', newButton), createArea, queryForm, box, tableArea);
  if (canList) {
    load();
    timer = setInterval(poll, LIVE_MS);
  } else {
    box.show('error', 'Your policy grants neither RegistryRead nor ServiceConnect, which listing devices needs.');
  }
  return () => {
    stopped = true;
    if (timer) clearInterval(timer);
  };
}
