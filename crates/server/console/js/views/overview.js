// Overview: the fleet's numbers (refreshed every 2 s), where the hub listens, the connection
// strings of the signed-in policy, and the built-in endpoint's consumer groups.

import {
  h, fill, field, notice, busy, describe, needs, pill, heading, section,
  secretLine, showKeysButton, every,
} from '../ui.js';

const REFRESH_MS = 2000;

/** Sums every series of `name` in a Prometheus text exposition; null when absent. */
function metric(text, name) {
  let sum = null;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== ' ' && rest[0] !== '{') continue;
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (Number.isFinite(value)) sum = (sum || 0) + value;
  }
  return sum;
}

function tile(label, hint) {
  const value = h('div', { class: 'value' }, '–');
  const el = h('div', { class: 'stat', role: 'group', 'aria-label': label },
    value, h('div', { class: 'label' }, label), hint ? h('div', { class: 'hint' }, hint) : null);
  el.set = (v, title) => {
    value.textContent = v === null || v === undefined ? '–' : String(v);
    if (title) el.title = title; else el.removeAttribute('title');
  };
  return el;
}

function rate(prev, now, key) {
  if (!prev || prev[key] === null || now[key] === null) return null;
  const seconds = (now.at - prev.at) / 1000;
  if (seconds <= 0) return null;
  const delta = now[key] - prev[key];
  const r = delta < 0 ? now[key] / seconds : delta / seconds;
  return r >= 10 ? Math.round(r) : Math.round(r * 10) / 10;
}

function serviceHost(facts) {
  return facts.httpsPort === 443 ? facts.hostName : `${facts.hostName}:${facts.httpsPort}`;
}

function hubConnectionString(ctx) {
  return `HostName=${serviceHost(ctx.facts)};SharedAccessKeyName=${ctx.conn.policy};SharedAccessKey=${ctx.conn.key}`;
}

/** The Event Hub-compatible connection string of `entity` (the built-in endpoint or a stream). */
export function eventsConnectionString(ctx, entity, plain = false) {
  const f = ctx.facts;
  if (plain) {
    if (!f.amqpPlainPort) return null;
    return `Endpoint=sb://${f.hostName}:${f.amqpPlainPort};SharedAccessKeyName=${ctx.conn.policy};SharedAccessKey=${ctx.conn.key};EntityPath=${entity};UseDevelopmentEmulator=true`;
  }
  if (!f.amqpPort) return null;
  const host = f.amqpPort === 5671 ? f.hostName : `${f.hostName}:${f.amqpPort}`;
  return `Endpoint=sb://${host}/;SharedAccessKeyName=${ctx.conn.policy};SharedAccessKey=${ctx.conn.key};EntityPath=${entity}`;
}

function statsPart(ctx) {
  const clustered = Boolean(ctx.facts.nodeId);
  const perNode = clustered ? 'this node' : null;
  const tiles = {
    total: tile('Total devices'),
    enabled: tile('Enabled devices'),
    disabled: tile('Disabled devices'),
    connected: tile('Connected devices'),
    messages: tile('Messages/s', perNode ? 'device-to-cloud, this node' : 'device-to-cloud'),
    methods: tile('Methods/s', perNode ? 'direct methods, this node' : 'direct methods'),
  };
  const box = notice();
  const live = h('span', { class: 'live-dot', 'aria-hidden': 'true' });
  const el = h('section', { class: 'overview-stats', 'aria-label': 'Statistics' },
    h('div', { class: 'stats' }, Object.values(tiles)),
    h('p', { class: 'hint live-note' }, live, 'Live: refreshed every 2 seconds.'),
    box);
  let prev = null;

  async function refresh() {
    const errors = [];
    const jobs = [];
    if (ctx.can('RegistryRead')) {
      jobs.push(ctx.api.get('/statistics/devices').then((s) => {
        tiles.total.set(s.totalDeviceCount);
        tiles.enabled.set(s.enabledDeviceCount);
        tiles.disabled.set(s.disabledDeviceCount);
      }, (e) => errors.push(e)));
    } else {
      for (const t of [tiles.total, tiles.enabled, tiles.disabled]) t.set(null, 'Your policy does not grant RegistryRead');
    }
    if (ctx.can('ServiceConnect')) {
      jobs.push(ctx.api.get('/statistics/service').then((s) => tiles.connected.set(s.connectedDeviceCount),
        (e) => errors.push(e)));
    } else {
      jobs.push(ctx.api.query("SELECT COUNT() AS n FROM devices WHERE connectionState = 'Connected'")
        .then(({ items }) => tiles.connected.set(items[0]?.n ?? 0), (e) => errors.push(e)));
    }
    jobs.push(fetch('/metrics', { cache: 'no-store' }).then(async (resp) => {
      if (!resp.ok) throw new Error(`/metrics answered HTTP ${resp.status}`);
      const text = await resp.text();
      const now = {
        at: performance.now(),
        messages: metric(text, 'twinhub_d2c_messages_total') ?? 0,
        methods: metric(text, 'twinhub_method_duration_seconds_count') ?? 0,
      };
      if (prev) {
        tiles.messages.set(rate(prev, now, 'messages'));
        tiles.methods.set(rate(prev, now, 'methods'));
      }
      prev = now;
    }).catch((e) => errors.push(e)));
    await Promise.all(jobs);
    if (errors.length) box.show('error', describe(errors[0]));
    else box.clear();
  }
  return { el, refresh };
}

function endpointsPart(ctx) {
  const f = ctx.facts;
  const ports = [
    ['Host name', h('code', {}, f.hostName)],
    ['HTTPS: REST API, MQTT and AMQP over WebSockets', h('code', {}, String(f.httpsPort))],
    ['MQTT over TLS', h('code', {}, String(f.mqttPort))],
    ['AMQP over TLS (Event Hub-compatible endpoint)', f.amqpPort ? h('code', {}, String(f.amqpPort)) : 'off'],
  ];
  if (f.amqpPlainPort) ports.push(['AMQP without TLS (emulator)', h('code', {}, String(f.amqpPlainPort))]);
  ports.push(['Event Hub-compatible name', f.eventHubName ? h('code', {}, f.eventHubName) : '–']);
  ports.push(['Partitions', String(f.partitions)]);
  ports.push(['Signed-in policy', h('code', {}, f.policy)]);
  ports.push(['Rights', h('span', { class: 'pills' }, f.rights.map((r) => pill(r, 'ok')))]);
  ports.push(['twinhub version', f.version]);
  if (f.nodeId) ports.push(['Node ID (clustered)', h('code', {}, f.nodeId)]);

  const lines = [secretLine('IoT Hub connection string', hubConnectionString(ctx), ctx.conn.key)];
  if (f.eventHubName) {
    const events = eventsConnectionString(ctx, f.eventHubName);
    if (events) lines.push(secretLine('Event Hub-compatible connection string', events, ctx.conn.key));
    const plain = eventsConnectionString(ctx, f.eventHubName, true);
    if (plain) lines.push(secretLine('Event Hub-compatible connection string (plaintext, emulator)', plain, ctx.conn.key));
  }
  const toggle = showKeysButton((shown) => lines.forEach((l) => l.reveal(shown)));
  return h('section', { class: 'card', 'aria-label': 'Endpoints and connection strings' },
    h('div', { class: 'section-head' }, h('h2', {}, 'Endpoints and connection strings'), toggle),
    h('dl', { class: 'props' }, ports.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
    h('div', { class: 'keylines' }, lines),
    h('p', { class: 'hint' },
      `The strings carry the key of the policy you signed in with (${f.policy}). Event Hubs SDKs read the built-in endpoint with the Event Hub-compatible one`,
      ctx.can('ServiceConnect') ? '.' : `, which needs ServiceConnect: ${f.policy} does not grant it.`));
}

function consumerGroupsPart(ctx) {
  const box = notice();
  const list = h('div', { class: 'table-wrap' });
  const canWrite = ctx.can('RegistryWrite');
  const input = h('input', { name: 'consumerGroup', autocomplete: 'off', spellcheck: 'false', required: true });
  const create = needs(h('button', { type: 'submit', class: 'primary' }, 'Create consumer group'), canWrite, 'RegistryWrite');
  needs(input, canWrite, 'RegistryWrite');
  const form = h('form', { class: 'row inline-form' },
    field('Consumer group name', input), h('div', { class: 'field' }, create));

  async function load() {
    if (!ctx.can('ServiceConnect')) {
      fill(list, h('p', { class: 'empty' }, 'Listing consumer groups needs ServiceConnect, which your policy does not grant.'));
      return;
    }
    const groups = await ctx.api.get('/eventHubEndpoints/events/consumerGroups');
    fill(list, h('table', {},
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Name'), h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
      h('tbody', {}, groups.map((g) => {
        const del = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Delete consumer group ${g.name}` }, 'Delete'),
          canWrite && g.name !== '$Default', g.name === '$Default' ? 'RegistryWrite (and $Default cannot be deleted)' : 'RegistryWrite');
        if (g.name === '$Default') del.title = 'The $Default consumer group cannot be deleted';
        del.addEventListener('click', () => busy(del, box, async () => {
          if (!window.confirm(`Delete the consumer group ${g.name}? Readers using it lose their place.`)) return;
          await ctx.api.del(`/eventHubEndpoints/events/consumerGroups/${encodeURIComponent(g.name)}`);
          box.show('ok', `Deleted the consumer group ${g.name}.`);
          await load();
        }));
        return h('tr', {}, h('td', {}, h('code', {}, g.name)), h('td', { class: 'cell-actions' }, del));
      }))));
  }

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const name = input.value.trim();
    if (!name) { input.focus(); return; }
    busy(create, box, async () => {
      box.clear();
      await ctx.api.put(`/eventHubEndpoints/events/consumerGroups/${encodeURIComponent(name)}`, {});
      input.value = '';
      box.show('ok', `Created the consumer group ${name}.`);
      await load();
    });
  });

  const el = section('Consumer groups',
    h('p', { class: 'hint' }, 'Of the built-in endpoint (events). Each reader of the Event Hub-compatible endpoint should use its own.'),
    list, form, box);
  return { el, load: () => load().catch((e) => box.show('error', describe(e))) };
}

export async function render(main, ctx) {
  const stats = statsPart(ctx);
  const groups = consumerGroupsPart(ctx);
  main.append(heading('Overview'), stats.el, endpointsPart(ctx), groups.el);
  groups.load();
  const stop = every(REFRESH_MS, stats.refresh);
  return stop;
}
