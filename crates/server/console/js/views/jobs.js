// Jobs: the hub's scheduled jobs (`/jobs/v2`), newest first, live while any has not finished;
// a form to schedule a direct method or a twin update on the devices a condition selects; a
// job's details with each device's result (`SELECT * FROM devices.jobs`), and cancelling.
// Every jobs call needs ServiceConnect, as in IoT Hub; the per-device query RegistryRead or
// ServiceConnect.

import {
  h, fill, field, notice, busy, describe, needs, pill, heading, time, pretty, parseJson, every,
} from '../ui.js';

const REFRESH_MS = 2000;
const TYPES = {
  scheduleDeviceMethod: 'Direct method',
  scheduleUpdateTwin: 'Twin update',
};
const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

const isTerminal = (status) => TERMINAL.has(status);
/** JSON on one line when short, else indented. */
const json = (v) => { const s = JSON.stringify(v); return s && s.length <= 80 ? s : pretty(v); };
const quote = (text) => `'${String(text).replace(/'/g, "''")}'`;

function newJobId() {
  const d = new Date();
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `job-${d.getFullYear()}${p(d.getMonth() + 1)}${p(d.getDate())}-${p(d.getHours())}${p(d.getMinutes())}${p(d.getSeconds())}`;
}

/** Now as a `datetime-local` value (local time, seconds). */
function localNow() {
  const d = new Date();
  d.setMilliseconds(0);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 19);
}

function newest(a, b) {
  const ta = Date.parse(a.createdTime || a.startTime || '') || 0;
  const tb = Date.parse(b.createdTime || b.startTime || '') || 0;
  return tb - ta || String(b.jobId).localeCompare(String(a.jobId));
}

/** The job's progress: a bar (succeeded, failed) and the counts. */
function progress(stats) {
  const s = stats || {};
  const total = s.deviceCount || 0;
  const done = (s.succeededCount || 0) + (s.failedCount || 0);
  const ok = h('span', { class: 'bar-ok' });
  const bad = h('span', { class: 'bar-failed' });
  if (total > 0) {
    ok.style.width = `${(100 * (s.succeededCount || 0)) / total}%`;
    bad.style.width = `${(100 * (s.failedCount || 0)) / total}%`;
  }
  const summary = total
    ? `${done} of ${total} done: ${s.succeededCount || 0} succeeded, ${s.failedCount || 0} failed, ${s.runningCount || 0} running, ${s.pendingCount || 0} pending`
    : 'No devices yet';
  return h('div', { class: 'job-progress' },
    h('div', {
      class: 'progress stacked', role: 'progressbar', 'aria-label': 'Devices done',
      'aria-valuemin': 0, 'aria-valuemax': total || 1, 'aria-valuenow': done, 'aria-valuetext': summary,
    }, ok, bad),
    h('small', { class: 'hint' }, summary));
}

function outcomeCell(row) {
  if (row.error) {
    const e = row.error;
    return h('span', { class: 'outcome-error' }, e.code ? `${e.code}: ${e.description || ''}` : pretty(e));
  }
  const m = row.outcome?.deviceMethodResponse;
  if (m) {
    return h('div', {},
      h('span', { class: 'outcome-status' }, `Status ${m.status}`),
      m.payload !== undefined && m.payload !== null ? h('pre', { class: 'outcome-payload' }, json(m.payload)) : null);
  }
  if (row.outcome && Object.keys(row.outcome).some((k) => row.outcome[k] !== null)) {
    return h('pre', { class: 'outcome-payload' }, json(row.outcome));
  }
  return row.status === 'completed' && row.jobType === 'scheduleUpdateTwin' ? 'Twin updated' : '';
}

export async function render(main, ctx) {
  const canRun = ctx.can('ServiceConnect');
  const box = notice();
  const newButton = needs(h('button', { type: 'button', class: 'primary', 'aria-expanded': 'false', 'aria-controls': 'job-form' }, 'New job'),
    canRun, 'ServiceConnect');
  const liveNote = h('span', { class: 'hint live-state', role: 'status' });

  // ---- The new job form ----
  const jobId = h('input', { name: 'jobId', required: true, autocomplete: 'off', spellcheck: 'false' });
  const jobType = h('select', { name: 'jobType' },
    Object.entries(TYPES).map(([value, label]) => h('option', { value }, label)));
  const condition = h('input', {
    name: 'queryCondition', required: true, autocomplete: 'off', spellcheck: 'false', class: 'mono',
    placeholder: "deviceId IN ['device-1', 'device-2']",
  });
  const methodName = h('input', { name: 'methodName', autocomplete: 'off', spellcheck: 'false' });
  const payload = h('textarea', { name: 'payload', class: 'code short', rows: 4, spellcheck: 'false' });
  const responseTimeout = h('input', { name: 'responseTimeout', type: 'number', min: 5, max: 300, step: 1, value: '30' });
  const connectTimeout = h('input', { name: 'connectTimeout', type: 'number', min: 0, max: 300, step: 1, value: '0' });
  const twinPatch = h('textarea', { name: 'twinPatch', class: 'code short', rows: 8, spellcheck: 'false' });
  const startTime = h('input', { name: 'startTime', type: 'datetime-local', step: 1 });
  const maxTime = h('input', { name: 'maxExecutionTime', type: 'number', min: 1, step: 1, value: '3600' });
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Schedule job');
  const close = h('button', { type: 'button' }, 'Close');
  const formBox = notice();
  const methodPart = h('fieldset', { class: 'job-part' }, h('legend', {}, 'Direct method'),
    h('div', { class: 'row' },
      field('Method name', methodName),
      field('Response timeout (s)', responseTimeout, '5 to 300'),
      field('Connect timeout (s)', connectTimeout, 'How long to wait for an offline device; 0 = online devices only')),
    field('Payload', payload, 'JSON; empty for none'));
  const twinPart = h('fieldset', { class: 'job-part', hidden: true }, h('legend', {}, 'Twin update'),
    field('Twin patch', twinPatch, 'JSON with tags and/or properties.desired; applied to each device\'s twin (etag "*").'));
  const form = h('form', { id: 'job-form', class: 'card job-form', 'aria-label': 'New job', hidden: true },
    h('h2', {}, 'New job'),
    h('div', { class: 'row' },
      field('Job ID', jobId),
      field('Job type', jobType)),
    field('Query condition', condition,
      "Which devices: a WHERE condition over device twins, e.g. deviceId IN ['a', 'b'] or tags.site = 'lab'; * for every device."),
    methodPart, twinPart,
    h('div', { class: 'row' },
      field('Start time', startTime, 'Your local time; now or earlier starts at once'),
      field('Max execution time (s)', maxTime)),
    formBox,
    h('div', { class: 'actions' }, submit, close));

  function resetForm() {
    jobId.value = newJobId();
    startTime.value = localNow();
    if (!payload.value) payload.value = '{}';
    if (!twinPatch.value) twinPatch.value = pretty({ properties: { desired: { telemetryInterval: 30 } } });
  }
  function showForm(open) {
    form.hidden = !open;
    newButton.setAttribute('aria-expanded', String(open));
    if (open) { resetForm(); formBox.clear(); jobId.focus(); } else newButton.focus();
  }
  newButton.addEventListener('click', () => showForm(form.hidden));
  close.addEventListener('click', () => showForm(false));
  jobType.addEventListener('change', () => {
    const method = jobType.value === 'scheduleDeviceMethod';
    methodPart.hidden = !method;
    twinPart.hidden = method;
  });

  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    formBox.clear();
    busy(submit, formBox, async () => {
      const id = jobId.value.trim();
      if (!id) throw new Error('Job ID is required.');
      if (!condition.value.trim()) { condition.focus(); throw new Error('Query condition is required: a WHERE condition, or * for every device.'); }
      const body = { jobId: id, type: jobType.value, queryCondition: condition.value.trim() };
      if (jobType.value === 'scheduleDeviceMethod') {
        if (!methodName.value.trim()) { methodName.focus(); throw new Error('Method name is required.'); }
        body.cloudToDeviceMethod = {
          methodName: methodName.value.trim(),
          payload: payload.value.trim() ? parseJson(payload.value, 'Payload') : null,
          responseTimeoutInSeconds: Number(responseTimeout.value || 30),
          connectTimeoutInSeconds: Number(connectTimeout.value || 0),
        };
      } else {
        const patch = parseJson(twinPatch.value, 'Twin patch');
        if (!patch || typeof patch !== 'object' || Array.isArray(patch)) throw new Error('Twin patch must be a JSON object.');
        body.updateTwin = { etag: '*', ...patch };
      }
      if (startTime.value) {
        const t = new Date(startTime.value);
        if (Number.isNaN(t.getTime())) throw new Error('Start time is not a valid time.');
        body.startTime = t.toISOString();
      }
      if (maxTime.value) body.maxExecutionTimeInSeconds = Number(maxTime.value);
      const job = await ctx.api.put(`/jobs/v2/${encodeURIComponent(id)}`, body);
      box.show('ok', `Scheduled the job ${job.jobId} (${job.status}).`);
      form.hidden = true;
      newButton.setAttribute('aria-expanded', 'false');
      jobId.value = '';
      await refreshList(true);
      select(job.jobId, true);
    });
  });

  // ---- The list ----
  const tbody = h('tbody');
  const emptyRow = h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No jobs yet.'));
  const table = h('div', { class: 'table-wrap' }, h('table', { class: 'jobs-table', 'aria-label': 'Jobs' },
    h('thead', {}, h('tr', {},
      ['Job ID', 'Type', 'Status', 'Start', 'End', 'Progress'].map((t) => h('th', { scope: 'col' }, t)),
      h('th', { scope: 'col' }, h('span', { class: 'visually-hidden' }, 'Actions')))),
    tbody));
  const rows = new Map();
  let jobs = [];
  let selected = null;

  function cancelButton(id, onDone) {
    const b = needs(h('button', { type: 'button', class: 'small danger', 'aria-label': `Cancel job ${id}` }, 'Cancel job'),
      canRun, 'ServiceConnect');
    b.addEventListener('click', () => busy(b, box, async () => {
      const job = await ctx.api.post(`/jobs/v2/${encodeURIComponent(id)}/cancel`);
      box.show('ok', `The job ${id} is ${job.status}.`);
      await refreshList(true);
      if (onDone) await onDone();
    }));
    return b;
  }

  function makeRow(job) {
    const idButton = h('button', { type: 'button', class: 'linklike', 'aria-label': `Show job ${job.jobId}` }, job.jobId);
    idButton.addEventListener('click', () => select(job.jobId, true));
    const cells = { type: h('td'), status: h('td'), start: h('td', { class: 'nowrap' }), end: h('td', { class: 'nowrap' }), progress: h('td', { class: 'cell-progress' }) };
    const cancel = cancelButton(job.jobId);
    const tr = h('tr', { dataset: { jobId: job.jobId } },
      h('th', { scope: 'row', class: 'job-id' }, idButton),
      cells.type, cells.status, cells.start, cells.end, cells.progress,
      h('td', { class: 'cell-actions' }, cancel));
    let last = '';
    tr.update = (j) => {
      const key = JSON.stringify(j);
      if (key === last) return;
      last = key;
      fill(cells.type, TYPES[j.type] || j.type);
      fill(cells.status, pill(j.status));
      fill(cells.start, time(j.startTime));
      fill(cells.end, time(j.endTime));
      fill(cells.progress, progress(j.deviceJobStatistics));
      cancel.hidden = isTerminal(j.status);
    };
    tr.update(job);
    return tr;
  }

  function drawList() {
    const ids = jobs.map((j) => j.jobId);
    for (const [id, tr] of rows) {
      if (!ids.includes(id)) { tr.remove(); rows.delete(id); }
    }
    jobs.forEach((j) => {
      let tr = rows.get(j.jobId);
      if (!tr) { tr = makeRow(j); rows.set(j.jobId, tr); } else tr.update(j);
      tr.classList.toggle('selected', j.jobId === selected);
      if (j.jobId === selected) tr.setAttribute('aria-current', 'true'); else tr.removeAttribute('aria-current');
    });
    const order = [...tbody.children];
    const wanted = jobs.map((j) => rows.get(j.jobId));
    if (wanted.length === 0) { fill(tbody, emptyRow); return; }
    if (order.length !== wanted.length || order.some((tr, i) => tr !== wanted[i])) fill(tbody, wanted);
  }

  async function fetchJobs() {
    const all = [];
    let continuation = null;
    for (let page = 0; page < 20; page++) {
      const headers = { 'x-ms-max-item-count': '100' };
      if (continuation) headers['x-ms-continuation'] = continuation;
      const resp = await ctx.api.fetch('GET', '/jobs/v2/query', { headers });
      const body = await resp.json();
      all.push(...(body.items || []));
      continuation = resp.headers.get('x-ms-continuation') || body.continuationToken || null;
      if (!continuation) break;
    }
    return all.sort(newest);
  }

  let listError = false;
  async function refreshList() {
    try {
      jobs = await fetchJobs();
      if (listError) { box.clear(); listError = false; }
    } catch (e) {
      box.show('error', describe(e));
      listError = true;
      throw e;
    }
    drawList();
  }

  // ---- A job's details ----
  const detail = h('section', { class: 'card job-detail', hidden: true, tabindex: '-1' });
  let detailJob = null;

  async function fetchDeviceJobs(id, continuation) {
    return ctx.api.query(`SELECT * FROM devices.jobs WHERE devices.jobs.jobId = ${quote(id)}`, { continuation, pageSize: 100 });
  }

  function deviceTable(items) {
    if (!items.length) return h('p', { class: 'empty' }, 'No device results yet.');
    return h('div', { class: 'table-wrap' }, h('table', { 'aria-label': 'Device results' },
      h('thead', {}, h('tr', {}, ['Device ID', 'Status', 'Start', 'End', 'Outcome'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, items.map((r) => h('tr', {},
        h('td', { class: 'nowrap' }, h('a', { href: `#/devices/${encodeURIComponent(r.deviceId)}` }, r.deviceId)),
        h('td', {}, pill(r.status)),
        h('td', { class: 'nowrap' }, time(r.startTimeUtc)),
        h('td', { class: 'nowrap' }, time(r.endTimeUtc)),
        h('td', { class: 'outcome' }, outcomeCell(r)))))));
  }

  async function drawDetail(id, focus) {
    const detailBox = notice();
    let job;
    try {
      job = await ctx.api.get(`/jobs/v2/${encodeURIComponent(id)}`);
    } catch (e) {
      detail.hidden = false;
      fill(detail, h('h2', {}, `Job ${id}`), detailBox);
      detailBox.show('error', describe(e));
      detailJob = null;
      return;
    }
    let devices = { items: [], continuation: null };
    const deviceBox = notice();
    try {
      devices = await fetchDeviceJobs(id);
    } catch (e) {
      deviceBox.show('error', describe(e));
    }
    if (selected !== id) return;
    detailJob = job;
    const props = [
      ['Type', TYPES[job.type] || job.type],
      ['Status', pill(job.status)],
      ['Query condition', h('code', {}, job.queryCondition || '')],
      ['Created', time(job.createdTime)],
      ['Start', time(job.startTime)],
      ['End', time(job.endTime) || '–'],
      ['Max execution time', job.maxExecutionTimeInSeconds ? `${job.maxExecutionTimeInSeconds} s` : '–'],
    ];
    if (job.cloudToDeviceMethod) {
      const m = job.cloudToDeviceMethod;
      props.push(['Method', h('code', {}, m.methodName)]);
      props.push(['Payload', h('pre', { class: 'outcome-payload' }, json(m.payload ?? null))]);
      props.push(['Timeouts', `response ${m.responseTimeoutInSeconds ?? 30} s, connect ${m.connectTimeoutInSeconds ?? 0} s`]);
    }
    if (job.updateTwin) {
      const { etag, ...patch } = job.updateTwin;
      props.push(['Twin patch', h('pre', { class: 'outcome-payload' }, pretty(patch))]);
    }
    if (job.failureReason) props.push(['Failure reason', job.failureReason]);
    if (job.statusMessage) props.push(['Status message', job.statusMessage]);
    props.push(['Progress', progress(job.deviceJobStatistics)]);

    const items = [...devices.items];
    let more = devices.continuation;
    const deviceList = h('div', {}, deviceTable(items));
    const moreButton = h('button', { type: 'button', hidden: !more }, 'Load more devices');
    moreButton.addEventListener('click', () => busy(moreButton, deviceBox, async () => {
      const page = await fetchDeviceJobs(id, more);
      items.push(...page.items);
      more = page.continuation;
      fill(deviceList, deviceTable(items));
      moreButton.hidden = !more;
    }));

    const closeDetail = h('button', { type: 'button', class: 'small' }, 'Close details');
    closeDetail.addEventListener('click', () => {
      const row = rows.get(id);
      select(null);
      row?.querySelector('button')?.focus();
    });
    const title = h('h2', { id: 'job-detail-title' }, `Job ${job.jobId}`);
    fill(detail,
      h('div', { class: 'section-head' }, title,
        h('div', { class: 'actions' }, isTerminal(job.status) ? null : cancelButton(job.jobId, () => drawDetail(id)), closeDetail)),
      h('dl', { class: 'props' }, props.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      detailBox,
      h('h3', {}, 'Device results'),
      deviceBox, deviceList, moreButton);
    detail.setAttribute('aria-labelledby', 'job-detail-title');
    detail.hidden = false;
    if (focus) detail.focus();
  }

  async function select(id, focus = false) {
    selected = id;
    detailJob = null;
    history.replaceState(null, '', id ? `#/jobs/${encodeURIComponent(id)}` : '#/jobs');
    drawList();
    if (!id) { detail.hidden = true; detail.replaceChildren(); return; }
    await drawDetail(id, focus);
  }

  // ---- Live refresh ----
  let lastDeviceRefresh = 0;
  async function tick() {
    const running = () => jobs.some((j) => !isTerminal(j.status)) || (detailJob && !isTerminal(detailJob.status));
    if (!running()) { liveNote.textContent = ''; return; }
    liveNote.textContent = 'Live: refreshing every 2 seconds while jobs run';
    await refreshList().catch(() => {});
    if (selected) {
      const now = jobs.find((j) => j.jobId === selected);
      const changed = !detailJob || !now || now.status !== detailJob.status
        || JSON.stringify(now.deviceJobStatistics) !== JSON.stringify(detailJob.deviceJobStatistics);
      if (changed || Date.now() - lastDeviceRefresh > 10000) {
        lastDeviceRefresh = Date.now();
        await drawDetail(selected, false);
      }
    }
    if (!running()) liveNote.textContent = '';
  }

  main.append(
    heading('Jobs', liveNote, newButton),
    ...(canRun ? [] : [h('div', { class: 'notice warn' }, 'Jobs need ServiceConnect, which your policy does not grant.')]),
    box, form, table, detail);

  if (!canRun) return undefined;
  await refreshList().catch(() => {});
  const wanted = decodeURIComponent(window.location.hash.replace(/^#\/?jobs\/?/, '').split('/')[0] || '');
  if (wanted) await select(wanted);
  const stop = every(REFRESH_MS, tick);
  return stop;
}
