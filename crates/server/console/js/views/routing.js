// Routing: the configuration in force (`GET /twinhub/routing`): custom endpoints (streams
// hosted by twinhub, webhooks), routes, enrichments and the fallback route, changed through
// `/twinhub/routing/...` (RegistryWrite), and the portal's "Test route" (a sample message run
// through the routes without sending it).

import {
  h, fill, field, notice, busy, describe, needs, pill, heading, section, pretty, parseJson,
  secretLine, showKeysButton,
} from '../ui.js';
import { eventsConnectionString } from './overview.js';

const SOURCES = [
  ['DeviceMessages', 'Device telemetry messages'],
  ['TwinChangeEvents', 'Device twin change events'],
  ['DeviceLifecycleEvents', 'Device lifecycle events'],
  ['DeviceConnectionStateEvents', 'Device connection state events'],
  ['DeviceJobLifecycleEvents', 'Device job lifecycle events'],
];
const BUILTIN = 'events';
const sourceLabel = (s) => (SOURCES.find(([v]) => v.toLowerCase() === String(s).toLowerCase()) || [s, s])[1];
const enc = encodeURIComponent;

function sourceSelect(name) {
  return h('select', { name }, SOURCES.map(([value, label]) => h('option', { value }, label)));
}

/** A group of checkboxes, one per endpoint; `value()` lists the checked, `set(list)` checks. */
function endpointChecks(legend, names) {
  const boxes = names.map((n) => {
    const input = h('input', { type: 'checkbox', value: n });
    return { n, input, el: h('label', { class: 'check' }, input, h('span', {}, n)) };
  });
  const el = h('fieldset', { class: 'checks' }, h('legend', {}, legend),
    boxes.length ? boxes.map((b) => b.el) : h('span', { class: 'hint' }, 'No endpoints.'));
  el.value = () => boxes.filter((b) => b.input.checked).map((b) => b.n);
  el.set = (list) => {
    const want = new Set((list || []).map((x) => x.toLowerCase()));
    for (const b of boxes) b.input.checked = want.has(b.n.toLowerCase());
  };
  el.disable = (off) => { for (const b of boxes) b.input.disabled = off; };
  return el;
}

export async function render(main, ctx) {
  const canWrite = ctx.can('RegistryWrite');
  const box = notice();
  const endpointsCard = h('div');
  const routesCard = h('div');
  const enrichCard = h('div');
  const fallbackCard = h('div');
  const testCard = h('div');
  main.append(heading('Routing'),
    ...(canWrite ? [] : [h('div', { class: 'notice warn' }, 'Changing routing needs RegistryWrite, which your policy does not grant; you can read and test it.')]),
    box, endpointsCard, routesCard, enrichCard, fallbackCard, testCard);

  let config = null;
  let keysShown = false;
  let editing = null; // the route being edited, by name

  async function load() {
    config = await ctx.api.get('/twinhub/routing');
    draw();
  }
  const act = (button, work, done) => busy(button, box, async () => {
    box.clear();
    await work();
    await load();
    if (done) box.show('ok', done);
  });

  function endpointNames() {
    return [BUILTIN, ...config.endpoints.map((e) => e.name)];
  }

  // ---- Endpoints ----
  function drawEndpoints() {
    const lines = [];
    const rows = [h('tr', {},
      h('th', { scope: 'row' }, h('code', {}, BUILTIN)),
      h('td', {}, 'events (built-in)'),
      h('td', {}, `The built-in endpoint: Event Hub-compatible, read as EntityPath=${ctx.facts.eventHubName || 'the hub name'} (see Overview).`),
      h('td'))];
    for (const e of config.endpoints) {
      let details;
      if (e.kind === 'stream') {
        const cs = eventsConnectionString(ctx, e.name);
        const line = cs ? secretLine(`Event Hub-compatible connection string of ${e.name}`, cs, ctx.conn.key) : null;
        if (line) { line.reveal(keysShown); lines.push(line); }
        details = h('div', {}, h('div', { class: 'hint' }, `A stream hosted by twinhub; read it with EntityPath=${e.name}.`), line);
      } else {
        details = h('div', {}, 'POST to ', h('code', {}, e.url || ''));
      }
      const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete endpoint ${e.name}` }, 'Delete'), canWrite, 'RegistryWrite');
      del.addEventListener('click', () => {
        if (!window.confirm(`Delete the endpoint ${e.name}?`)) return;
        act(del, () => ctx.api.del(`/twinhub/routing/endpoints/${enc(e.name)}`), `Deleted the endpoint ${e.name}.`);
      });
      rows.push(h('tr', {},
        h('th', { scope: 'row' }, h('code', {}, e.name)),
        h('td', {}, e.kind),
        h('td', { class: 'endpoint-details' }, details),
        h('td', { class: 'cell-actions' }, del)));
    }
    const toggle = showKeysButton((shown) => { keysShown = shown; lines.forEach((l) => l.reveal(shown)); });
    toggle.setAttribute('aria-pressed', String(keysShown));

    const name = needs(h('input', { name: 'endpointName', autocomplete: 'off', spellcheck: 'false', required: true }), canWrite, 'RegistryWrite');
    const kind = needs(h('select', { name: 'endpointType' },
      h('option', { value: 'stream' }, 'Stream (Event Hub-compatible, hosted by twinhub)'),
      h('option', { value: 'webhook' }, 'Webhook (HTTP POST, CloudEvents)')), canWrite, 'RegistryWrite');
    const url = h('input', { name: 'webhookUrl', type: 'url', autocomplete: 'off', spellcheck: 'false', placeholder: 'https://example.com/hook' });
    const urlField = field('Webhook URL', url);
    urlField.hidden = true;
    kind.addEventListener('change', () => { urlField.hidden = kind.value !== 'webhook'; });
    const add = needs(h('button', { type: 'submit', class: 'primary' }, 'Add endpoint'), canWrite, 'RegistryWrite');
    const form = h('form', { class: 'row inline-form', 'aria-label': 'Add endpoint' },
      field('Endpoint name', name, 'Letters, digits, - and _'), field('Endpoint type', kind), urlField, h('div', { class: 'field' }, add));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const n = name.value.trim();
      if (!n) { name.focus(); return; }
      const body = { kind: kind.value };
      if (kind.value === 'webhook') body.url = url.value.trim();
      act(add, () => ctx.api.put(`/twinhub/routing/endpoints/${enc(n)}`, body), `Added the endpoint ${n}.`);
    });

    fill(endpointsCard, h('section', { class: 'card', 'aria-label': 'Endpoints' },
      h('div', { class: 'section-head' }, h('h2', {}, 'Endpoints'), lines.length ? toggle : null),
      h('div', { class: 'table-wrap' }, h('table', { class: 'data', 'aria-label': 'Endpoints' },
        h('thead', {}, h('tr', {}, ['Name', 'Type', 'Details'].map((t) => h('th', { scope: 'col' }, t)),
          h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
        h('tbody', {}, rows))),
      form));
  }

  // ---- Routes ----
  function drawRoutes() {
    const rows = config.routes.map((r) => {
      const edit = needs(h('button', { type: 'button', class: 'small', 'aria-label': `Edit route ${r.name}` }, 'Edit'), canWrite, 'RegistryWrite');
      edit.addEventListener('click', () => { editing = r.name; drawRoutes(); routesCard.querySelector('form [name="condition"]')?.focus(); });
      const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete route ${r.name}` }, 'Delete'), canWrite, 'RegistryWrite');
      del.addEventListener('click', () => {
        if (!window.confirm(`Delete the route ${r.name}?`)) return;
        if (editing === r.name) editing = null;
        act(del, () => ctx.api.del(`/twinhub/routing/routes/${enc(r.name)}`), `Deleted the route ${r.name}.`);
      });
      return h('tr', { class: editing === r.name ? 'selected' : null },
        h('th', { scope: 'row' }, h('code', {}, r.name)),
        h('td', {}, sourceLabel(r.source)),
        h('td', {}, h('code', { class: 'condition' }, r.condition)),
        h('td', {}, r.endpoints.map((e, i) => [i ? ', ' : '', h('code', {}, e)])),
        h('td', {}, pill(r.enabled ? 'enabled' : 'disabled')),
        h('td', { class: 'cell-actions' }, h('div', { class: 'actions row-actions' }, edit, del)));
    });

    const current = editing ? config.routes.find((r) => r.name === editing) : null;
    if (editing && !current) editing = null;
    const name = h('input', { name: 'routeName', autocomplete: 'off', spellcheck: 'false', required: true, readonly: Boolean(current) });
    const source = sourceSelect('source');
    const condition = h('textarea', { name: 'condition', class: 'code condition-input', rows: 2, spellcheck: 'false' });
    const targets = endpointChecks('Endpoints', endpointNames());
    const enabled = h('input', { type: 'checkbox', name: 'enabled' });
    const save = needs(h('button', { type: 'submit', class: 'primary' }, current ? 'Save route' : 'Add route'), canWrite, 'RegistryWrite');
    const cancel = h('button', { type: 'button', hidden: !current }, 'Stop editing');
    if (current) {
      name.value = current.name;
      source.value = SOURCES.find(([v]) => v.toLowerCase() === current.source.toLowerCase())?.[0] || current.source;
      condition.value = current.condition;
      targets.set(current.endpoints);
      enabled.checked = current.enabled;
    } else {
      condition.value = 'true';
      targets.set([BUILTIN]);
      enabled.checked = true;
    }
    for (const c of [name, source, condition, enabled]) needs(c, canWrite, 'RegistryWrite');
    targets.disable(!canWrite);
    cancel.addEventListener('click', () => { editing = null; drawRoutes(); });
    const form = h('form', { class: 'route-form', 'aria-label': current ? `Edit route ${current.name}` : 'Add route' },
      h('h3', {}, current ? `Edit route ${current.name}` : 'Add a route'),
      h('div', { class: 'row' }, field('Route name', name, current ? 'A route keeps its name; delete it and add another to rename.' : 'Letters, digits, - and _'), field('Source', source)),
      field('Condition', condition, "IoT Hub's routing query, e.g. $body.temperature > 30 AND alert = 'true'; true matches every message."),
      targets,
      h('label', { class: 'check' }, enabled, h('span', {}, 'Enabled')),
      h('div', { class: 'actions form-actions' }, save, cancel));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const n = name.value.trim();
      if (!n) { name.focus(); return; }
      const body = {
        source: source.value, condition: condition.value.trim() || 'true', endpoints: targets.value(), enabled: enabled.checked,
      };
      if (!body.endpoints.length) { box.show('error', 'Choose at least one endpoint for the route.'); return; }
      act(save, async () => {
        if (current) {
          // The hub's PUT adds only; replace by delete and add, restoring the old route when
          // the new one is refused.
          await ctx.api.del(`/twinhub/routing/routes/${enc(current.name)}`);
          try {
            await ctx.api.put(`/twinhub/routing/routes/${enc(n)}`, body);
          } catch (e) {
            const { name: _n, ...old } = current;
            await ctx.api.put(`/twinhub/routing/routes/${enc(current.name)}`, old).catch(() => {});
            throw e;
          }
        } else {
          await ctx.api.put(`/twinhub/routing/routes/${enc(n)}`, body);
        }
        editing = null;
      }, current ? `Saved the route ${n}.` : `Added the route ${n}.`);
    });

    fill(routesCard, section('Routes',
      config.routes.length
        ? h('div', { class: 'table-wrap' }, h('table', { class: 'data', 'aria-label': 'Routes' },
          h('thead', {}, h('tr', {}, ['Name', 'Source', 'Condition', 'Endpoints', 'Enabled'].map((t) => h('th', { scope: 'col' }, t)),
            h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
          h('tbody', {}, rows)))
        : h('p', { class: 'empty' }, 'No routes: device messages go to the built-in endpoint through the fallback route, if it is on.'),
      form));
  }

  // ---- Enrichments ----
  function drawEnrichments() {
    const rows = config.enrichments.map((n) => {
      const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete enrichment ${n.key}` }, 'Delete'), canWrite, 'RegistryWrite');
      del.addEventListener('click', () => act(del, () => ctx.api.del(`/twinhub/routing/enrichments/${enc(n.key)}`), `Deleted the enrichment ${n.key}.`));
      return h('tr', {},
        h('th', { scope: 'row' }, h('code', {}, n.key)),
        h('td', {}, h('code', {}, n.value)),
        h('td', {}, n.endpoints.map((e, i) => [i ? ', ' : '', h('code', {}, e)])),
        h('td', { class: 'cell-actions' }, del));
    });
    const key = needs(h('input', { name: 'enrichmentKey', autocomplete: 'off', spellcheck: 'false', required: true }), canWrite, 'RegistryWrite');
    const value = needs(h('input', { name: 'enrichmentValue', autocomplete: 'off', spellcheck: 'false', required: true }), canWrite, 'RegistryWrite');
    const targets = endpointChecks('Enrichment endpoints', endpointNames());
    targets.set([BUILTIN]);
    targets.disable(!canWrite);
    const add = needs(h('button', { type: 'submit', class: 'primary' }, 'Add enrichment'), canWrite, 'RegistryWrite');
    const form = h('form', { class: 'enrichment-form', 'aria-label': 'Add enrichment' },
      h('h3', {}, 'Add an enrichment'),
      h('div', { class: 'row' }, field('Enrichment key', key), field('Value', value, 'Text, $iothubname, $twin.tags.site or $twin.properties.desired.x')),
      targets, h('div', { class: 'actions form-actions' }, add));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const k = key.value.trim();
      if (!k) { key.focus(); return; }
      act(add, () => ctx.api.put(`/twinhub/routing/enrichments/${enc(k)}`, { value: value.value, endpoints: targets.value() }),
        `Added the enrichment ${k}.`);
    });
    fill(enrichCard, section('Enrichments',
      rows.length
        ? h('div', { class: 'table-wrap' }, h('table', { class: 'data', 'aria-label': 'Enrichments' },
          h('thead', {}, h('tr', {}, ['Key', 'Value', 'Endpoints'].map((t) => h('th', { scope: 'col' }, t)),
            h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
          h('tbody', {}, rows)))
        : h('p', { class: 'empty' }, 'No enrichments.'),
      form));
  }

  // ---- Fallback ----
  function drawFallback() {
    const on = config.fallback.enabled;
    const toggle = needs(h('input', { type: 'checkbox', name: 'fallback', checked: on }), canWrite, 'RegistryWrite');
    toggle.addEventListener('change', () => act(toggle,
      () => ctx.api.put('/twinhub/routing/fallback', { enabled: toggle.checked }),
      `The fallback route is ${toggle.checked ? 'on' : 'off'}.`));
    fill(fallbackCard, section('Fallback route',
      h('p', {}, 'Device messages that match no route go to the built-in endpoint (events) while the fallback route is on. ',
        pill(on ? 'enabled' : 'disabled')),
      h('label', { class: 'check' }, toggle, h('span', {}, 'Fallback route enabled'))));
  }

  // ---- Test route ----
  function drawTest() {
    const source = sourceSelect('testSource');
    const deviceId = h('input', { name: 'testDeviceId', autocomplete: 'off', spellcheck: 'false' });
    const body = h('textarea', { name: 'testBody', class: 'code short', rows: 5, spellcheck: 'false' });
    body.value = pretty({ temperature: 35, humidity: 40 });
    const props = h('textarea', { name: 'testProperties', class: 'code short', rows: 3, spellcheck: 'false' });
    props.value = pretty({ alert: 'true' });
    const contentType = h('input', { name: 'contentType', value: 'application/json', autocomplete: 'off' });
    const contentEncoding = h('input', { name: 'contentEncoding', value: 'utf-8', autocomplete: 'off' });
    const run = h('button', { type: 'submit', class: 'primary' }, 'Test route');
    const out = notice();
    const result = h('div', { class: 'test-result', 'aria-live': 'polite' });
    const form = h('form', { 'aria-label': 'Test route' },
      h('div', { class: 'row' }, field('Message source', source), field('Device ID', deviceId, 'Optional; $twin conditions read this device\'s twin')),
      h('div', { class: 'grid' },
        field('Message body', body, 'Routing reads $body only when the content type is application/json and the encoding UTF-8'),
        field('Application properties', props, 'JSON object of text values')),
      h('div', { class: 'row' }, field('Content type', contentType), field('Content encoding', contentEncoding)),
      h('div', { class: 'actions form-actions' }, run), out, result);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      out.clear();
      fill(result);
      busy(run, out, async () => {
        const properties = props.value.trim() ? parseJson(props.value, 'Application properties') : {};
        const req = {
          source: source.value,
          body: body.value,
          properties,
          contentType: contentType.value.trim() || undefined,
          contentEncoding: contentEncoding.value.trim() || undefined,
          deviceId: deviceId.value.trim() || undefined,
        };
        const r = await ctx.api.post('/twinhub/routing/test', req);
        const matched = r.matchedRoutes || [];
        out.show(matched.length || r.fallback ? 'ok' : 'info',
          (matched.length ? `Matched routes: ${matched.join(', ')}.` : 'No route matched.')
          + (r.fallback ? ' The fallback route takes it to events.' : ''));
        fill(result, r.endpoints?.length
          ? h('div', { class: 'table-wrap' }, h('table', { class: 'data', 'aria-label': 'Test result endpoints' },
            h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Endpoint'), h('th', { scope: 'col' }, 'Application properties it would get'))),
            h('tbody', {}, r.endpoints.map((e) => h('tr', {},
              h('th', { scope: 'row' }, h('code', {}, e.name)),
              h('td', {}, h('code', {}, JSON.stringify(e.properties))))))))
          : h('p', { class: 'hint' }, 'No endpoint would get this message.'));
      });
    });
    fill(testCard, section('Test route',
      h('p', { class: 'hint' }, 'Runs a sample message through the routes in force without sending it.'), form));
  }

  function draw() {
    drawEndpoints();
    drawRoutes();
    drawEnrichments();
    drawFallback();
  }

  await load();
  drawTest();
  return undefined;
}
