// The hub's REST API as the console calls it: one signed fetch, IoT Hub's error bodies turned
// into ApiError (status, error code name, message), the query with continuation tokens, and the
// live telemetry stream read from a fetch body (EventSource cannot send an Authorization header).

import { sasToken } from './sas.js';

export const API_VERSION = '2021-04-12';

/** An error in IoT Hub's words: HTTP status, the code name (`DeviceNotFound`), its number. */
export class ApiError extends Error {
  constructor(status, code, number, message) {
    super(message);
    this.status = status;
    this.code = code;
    this.number = number;
  }
  toString() {
    const code = this.code ? `${this.code}${this.number ? ` (${this.number})` : ''}` : `HTTP ${this.status}`;
    return `${code}: ${this.message}`;
  }
}

async function errorFrom(resp) {
  const code = resp.headers.get('iothub-errorcode') || '';
  let number = 0;
  let message = resp.statusText || `HTTP ${resp.status}`;
  const text = await resp.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    const inner = typeof body.Message === 'string' ? body.Message : '';
    try {
      const detail = JSON.parse(inner);
      number = detail.errorCode || 0;
      message = detail.message || message;
    } catch {
      if (inner) message = inner;
    }
  } catch {
    if (text) message = text.trim().slice(0, 500);
  }
  return new ApiError(resp.status, code, number, message);
}

export class Api {
  /** `conn`: `{host, policy, key}` from the connection string. */
  constructor(conn) {
    this.conn = conn;
    this.cached = null;
  }

  async authorization() {
    const now = Math.floor(Date.now() / 1000);
    if (!this.cached || this.cached.expiry - now < 300) {
      this.cached = await sasToken(this.conn.host, this.conn.key, this.conn.policy, 3600);
    }
    return this.cached.token;
  }

  url(path, params = {}) {
    const u = new URL(path, window.location.origin);
    u.searchParams.set('api-version', API_VERSION);
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== '') u.searchParams.set(k, v);
    }
    return u;
  }

  /** The raw Response of a signed call; throws ApiError when it is not 2xx. */
  async fetch(method, path, { body, headers = {}, params, signal } = {}) {
    const init = { method, headers: { Authorization: await this.authorization(), ...headers }, signal };
    if (body !== undefined) {
      init.body = typeof body === 'string' ? body : JSON.stringify(body);
      init.headers['Content-Type'] = 'application/json; charset=utf-8';
    }
    let resp;
    try {
      resp = await fetch(this.url(path, params), init);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, 'ServiceUnavailable', 0, `The hub cannot be reached: ${e.message}`);
    }
    if (!resp.ok) throw await errorFrom(resp);
    return resp;
  }

  async json(method, path, options) {
    const resp = await this.fetch(method, path, options);
    if (resp.status === 204) return null;
    const text = await resp.text();
    return text ? JSON.parse(text) : null;
  }

  get(path, options) { return this.json('GET', path, options); }
  put(path, body, options = {}) { return this.json('PUT', path, { ...options, body }); }
  patch(path, body, options = {}) { return this.json('PATCH', path, { ...options, body }); }
  post(path, body, options = {}) { return this.json('POST', path, { ...options, body }); }
  del(path, options) { return this.json('DELETE', path, options); }

  /** One page of an IoT Hub query: `{items, continuation}`. */
  async query(sql, { continuation, pageSize = 50 } = {}) {
    const headers = { 'x-ms-max-item-count': String(pageSize) };
    if (continuation) headers['x-ms-continuation'] = continuation;
    const resp = await this.fetch('POST', '/devices/query', { body: { query: sql }, headers });
    const items = await resp.json();
    return { items, continuation: resp.headers.get('x-ms-continuation') || null };
  }

  /** The hub's facts and the signed-in policy's rights (`GET /twinhub/hub`). */
  facts() { return this.get('/twinhub/hub'); }

  /**
   * Streams telemetry (`GET /twinhub/telemetry`) until `signal` aborts, calling `onEvent(msg)`
   * for each message. Reconnects by itself with a fresh token when the stream ends (token
   * expiry) from the last event id; calls `onState('open'|'retrying', error?)`.
   */
  async stream({ deviceId, moduleId, from = 'latest', signal, onEvent, onState = () => {} }) {
    let lastId = null;
    while (!signal.aborted) {
      try {
        const headers = { Accept: 'text/event-stream' };
        if (lastId) headers['Last-Event-ID'] = lastId;
        const resp = await this.fetch('GET', '/twinhub/telemetry', {
          headers, signal, params: { deviceId, moduleId, from: lastId ? undefined : from },
        });
        onState('open');
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let data = '';
            let id = null;
            for (const line of block.split('\n')) {
              if (line.startsWith('data:')) data += (data ? '\n' : '') + line.slice(5).replace(/^ /, '');
              else if (line.startsWith('id:')) id = line.slice(3).trim();
            }
            if (id) lastId = id;
            if (data) onEvent(JSON.parse(data));
          }
        }
      } catch (e) {
        if (signal.aborted || e.name === 'AbortError') return;
        onState('retrying', e);
        if (e instanceof ApiError && (e.status === 401 || e.status === 403 || e.status === 400)) return;
      }
      if (!signal.aborted) await new Promise((r) => setTimeout(r, 1000));
    }
  }
}
