// Small DOM helpers every view shares: element building, labelled form fields, messages in
// IoT Hub's words, copy buttons, times, and a JSON text editor. No framework: views rebuild
// their part of the page from data.

/**
 * `h('button', {class: 'primary', onclick}, 'Save')`: attributes (`on*` become listeners,
 * `false`/null are left out), then children (strings, nodes, arrays, null).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let fieldCounter = 0;
/** A labelled control: `field('Device ID', h('input', {...}), 'hint')`. Returns the wrapper. */
export function field(label, control, hint) {
  const id = control.id || `f${++fieldCounter}`;
  control.id = id;
  const hintId = hint ? `${id}-hint` : null;
  if (hintId) control.setAttribute('aria-describedby', hintId);
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    control,
    hint ? h('small', { id: hintId, class: 'hint' }, hint) : null);
}

/** A message box for results and errors; `show(kind, text)` with kind ok|error|info. */
export function notice() {
  const el = h('div', { class: 'notice', role: 'status', 'aria-live': 'polite', hidden: true });
  el.show = (kind, text) => {
    el.className = `notice ${kind}`;
    el.setAttribute('role', kind === 'error' ? 'alert' : 'status');
    el.textContent = String(text);
    el.hidden = false;
  };
  el.clear = () => { el.hidden = true; el.textContent = ''; };
  return el;
}

/** Runs `work` with `button` disabled, showing an error from it in `box`. */
export async function busy(button, box, work) {
  const was = button.disabled;
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try {
    return await work();
  } catch (e) {
    if (box) box.show('error', describe(e));
    else throw e;
  } finally {
    button.disabled = was;
    button.removeAttribute('aria-busy');
  }
}

/** An error as the user should read it (ApiError prints its code and message). */
export function describe(e) {
  if (!e) return 'Unknown error';
  return e.toString ? e.toString().replace(/^Error: /, '') : String(e);
}

/** A button copying `text()` to the clipboard, saying so. */
export function copyButton(label, text, accessibleName) {
  const b = h('button', { type: 'button', class: 'small', 'aria-label': accessibleName || label });
  b.textContent = label;
  b.addEventListener('click', async () => {
    const value = typeof text === 'function' ? await text() : text;
    try {
      await navigator.clipboard.writeText(value);
      b.textContent = 'Copied';
    } catch {
      // Without clipboard permission, select the text for the user to copy.
      window.prompt('Copy this:', value);
    }
    setTimeout(() => { b.textContent = label; }, 1500);
  });
  return b;
}

/** An ISO time as local date and time with milliseconds; empty for IoT Hub's "never". */
export function time(iso) {
  if (!iso || iso.startsWith('0001-01-01')) return '';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { hour12: false }) + `.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

export function pretty(value) {
  return JSON.stringify(value, null, 2);
}

/** Parses JSON from a textarea, throwing a message that names the field. */
export function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not valid JSON: ${e.message}`);
  }
}

/** A control disabled because the policy lacks `right`, saying so in its title and name. */
export function needs(control, allowed, right) {
  if (!allowed) {
    control.disabled = true;
    control.title = `Your policy does not grant ${right}`;
    control.dataset.needs = right;
  }
  return control;
}

/** A status pill: connected / disconnected / enabled / disabled... */
export function pill(text, kind) {
  return h('span', { class: `pill ${kind || text.toLowerCase()}` }, text);
}

/** A page heading with optional actions to its right. */
export function heading(title, ...actions) {
  return h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, title), h('div', { class: 'actions' }, actions));
}

export function section(title, ...children) {
  return h('section', { class: 'card', 'aria-label': title }, h('h2', {}, title), children);
}

// --- Helpers added with the overview, jobs, routing and telemetry views ---

/**
 * A connection string with its key masked (`reveal(shown)` toggles it); the copy button
 * always copies the whole string. `label` names the group and the copy button.
 */
export function secretLine(label, text, key) {
  const code = h('code', { class: 'keyline-text' });
  const el = h('div', { class: 'keyline', role: 'group', 'aria-label': label },
    h('div', { class: 'keyline-label' }, label),
    h('div', { class: 'keyline-row' }, code, copyButton('Copy', () => text, `Copy ${label}`)));
  el.reveal = (shown) => {
    code.textContent = shown || !key ? text : text.split(key).join('••••••••••••');
  };
  el.reveal(false);
  return el;
}

/** A "Show keys" toggle (aria-pressed) calling `onToggle(shown)`. */
export function showKeysButton(onToggle) {
  const b = h('button', { type: 'button', class: 'small keys-toggle', 'aria-pressed': 'false' }, 'Show keys');
  b.addEventListener('click', () => {
    const shown = b.getAttribute('aria-pressed') !== 'true';
    b.setAttribute('aria-pressed', String(shown));
    onToggle(shown);
  });
  return b;
}

/** A timer calling async `work()` every `ms` after the previous run ended; returns stop(). */
export function every(ms, work) {
  let stopped = false;
  let timer = null;
  const run = async () => {
    if (stopped) return;
    try { await work(); } catch { /* the work shows its own errors */ }
    if (!stopped) timer = setTimeout(run, ms);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}
