// Telemetry: the hub-wide live view of the built-in endpoint (`GET /twinhub/telemetry`, as
// server-sent events read through `ctx.api.stream`), optionally for one device, from now or
// from the earliest retained message. Newest first, at most MAX_EVENTS kept on the page.
// ServiceConnect, as reading the Event Hub-compatible endpoint needs.

import { h, fill, field, needs, heading, describe, time, pretty } from '../ui.js';

const MAX_EVENTS = 500;

function bodyOf(ev) {
  if (ev.body !== undefined && ev.body !== null) {
    let parsed;
    try { parsed = JSON.parse(ev.body); } catch { parsed = undefined; }
    let text = ev.body;
    if (parsed !== undefined && parsed !== null && typeof parsed === 'object') {
      const flat = JSON.stringify(parsed);
      text = flat.length <= 100 ? flat : pretty(parsed);
    }
    return text === '' ? h('p', { class: 'hint' }, 'Empty body.') : h('pre', { class: 'event-body' }, text);
  }
  if (ev.bodyBase64) {
    return h('div', {}, h('p', { class: 'hint' }, 'Not UTF-8; the body in base64:'), h('pre', { class: 'event-body' }, ev.bodyBase64));
  }
  return h('p', { class: 'hint' }, 'Empty body.');
}

function propsTable(props) {
  return h('dl', { class: 'props event-proplist' },
    Object.entries(props).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v === null || v === undefined ? h('span', { class: 'hint' }, '(no value)') : String(v))]));
}

function entry(ev) {
  const app = ev.properties || {};
  const sys = ev.systemProperties || {};
  const appCount = Object.keys(app).length;
  const sysCount = Object.keys(sys).length;
  return h('article', { class: 'event', 'aria-label': `Message from ${ev.deviceId}${ev.moduleId ? `/${ev.moduleId}` : ''}` },
    h('div', { class: 'meta' },
      h('a', { href: `#/devices/${encodeURIComponent(ev.deviceId)}`, class: 'event-device' }, ev.deviceId),
      ev.moduleId ? h('span', {}, `module ${ev.moduleId}`) : null,
      h('time', { datetime: ev.enqueuedTime }, time(ev.enqueuedTime) || ev.enqueuedTime || ''),
      h('span', {}, `partition ${ev.partition} · sequence ${ev.sequenceNumber}`),
      ev.source && ev.source !== 'Telemetry' ? h('span', {}, ev.source) : null),
    bodyOf(ev),
    h('div', { class: 'event-details' },
      h('details', {}, h('summary', {}, `Application properties (${appCount})`),
        appCount ? propsTable(app) : h('p', { class: 'hint' }, 'None.')),
      h('details', {}, h('summary', {}, `System properties (${sysCount})`),
        sysCount ? propsTable(sys) : h('p', { class: 'hint' }, 'None.'))));
}

export function render(main, ctx) {
  const canRead = ctx.can('ServiceConnect');
  const deviceId = h('input', { name: 'deviceId', autocomplete: 'off', spellcheck: 'false', placeholder: 'All devices' });
  const from = h('select', { name: 'from' },
    h('option', { value: 'latest' }, 'Now'),
    h('option', { value: 'earliest' }, 'Earliest retained'));
  const start = h('button', { type: 'submit', class: 'primary' }, 'Start');
  const stop = h('button', { type: 'button' }, 'Stop');
  const clear = h('button', { type: 'button' }, 'Clear');
  for (const c of [deviceId, from, start, stop]) needs(c, canRead, 'ServiceConnect');
  stop.disabled = true;

  const state = h('span', { class: 'stream-state', role: 'status' });
  const count = h('span', { class: 'hint' });
  const list = h('div', { class: 'events telemetry-events', role: 'log', 'aria-label': 'Live telemetry', 'aria-live': 'off', tabindex: '0' });
  const empty = h('p', { class: 'empty' }, 'No messages yet.');
  list.append(empty);

  const form = h('form', { class: 'row telemetry-controls', 'aria-label': 'Telemetry filter' },
    field('Device ID', deviceId, 'Empty for all devices'),
    field('From', from),
    h('div', { class: 'field telemetry-buttons' }, h('div', { class: 'actions' }, start, stop, clear)));

  main.append(heading('Telemetry'),
    h('section', { class: 'card', 'aria-label': 'Live telemetry stream' },
      form,
      h('p', { class: 'telemetry-status' }, state, ' ', count),
      list));

  let controller = null;
  let received = 0;

  function setState(text, kind = '') {
    state.textContent = text;
    state.className = `stream-state ${kind}`;
  }

  function onEvent(ev) {
    received += 1;
    empty.remove();
    list.prepend(entry(ev));
    while (list.childElementCount > MAX_EVENTS) list.lastElementChild.remove();
    count.textContent = `${received} received · ${list.childElementCount} shown, newest first (at most ${MAX_EVENTS})`;
  }

  function halt(text) {
    if (controller) controller.abort();
    controller = null;
    start.disabled = !canRead;
    stop.disabled = true;
    if (text) setState(text);
  }

  function listen() {
    halt();
    if (!canRead) { setState('Telemetry needs ServiceConnect, which your policy does not grant.', 'error'); return; }
    const mine = new AbortController();
    controller = mine;
    start.disabled = true;
    stop.disabled = false;
    const who = deviceId.value.trim();
    const whence = from.selectedOptions[0].textContent.toLowerCase();
    setState('Connecting…');
    let lastError = null;
    ctx.api.stream({
      deviceId: who || undefined,
      from: from.value,
      signal: mine.signal,
      onEvent,
      onState: (st, err) => {
        if (mine.signal.aborted) return;
        if (st === 'open') {
          lastError = null;
          setState(`Listening… (${who ? `device ${who}` : 'all devices'}, from ${whence})`, 'ok');
        } else {
          lastError = err;
          setState(`Reconnecting: ${describe(err)}`, 'warn');
        }
      },
    }).then(() => {
      if (controller !== mine || mine.signal.aborted) return;
      halt();
      setState(`Stopped: ${lastError ? describe(lastError) : 'the stream ended'}`, 'error');
    }, (e) => {
      if (controller !== mine || mine.signal.aborted) return;
      halt();
      setState(`Stopped: ${describe(e)}`, 'error');
    });
  }

  form.addEventListener('submit', (ev) => { ev.preventDefault(); listen(); });
  stop.addEventListener('click', () => { halt('Stopped'); start.focus(); });
  clear.addEventListener('click', () => {
    fill(list, empty);
    received = 0;
    count.textContent = '';
  });

  listen();
  return () => halt();
}
