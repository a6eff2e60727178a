// Connection strings and SAS tokens, made in the browser with WebCrypto (as Azure IoT Explorer
// does): the key never leaves the page; only signed, expiring tokens go to the hub.

/** Parses `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...` (any order). */
export function parseConnectionString(text) {
  const fields = {};
  for (const part of String(text).trim().split(';')) {
    if (!part.trim()) continue;
    const eq = part.indexOf('=');
    if (eq <= 0) throw new Error(`"${part.slice(0, 40)}" is not a key=value pair`);
    fields[part.slice(0, eq).trim().toLowerCase()] = part.slice(eq + 1).trim();
  }
  const host = fields.hostname;
  const policy = fields.sharedaccesskeyname;
  const key = fields.sharedaccesskey;
  if (fields.deviceid) {
    throw new Error('This is a device connection string; sign in with a hub policy\'s (HostName, SharedAccessKeyName, SharedAccessKey), e.g. iothubowner\'s.');
  }
  if (!host || !policy || !key) {
    throw new Error('A hub connection string needs HostName, SharedAccessKeyName and SharedAccessKey.');
  }
  try {
    atob(key);
  } catch {
    throw new Error('SharedAccessKey is not base64.');
  }
  return { host, policy, key };
}

function base64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToBase64(bytes) {
  let bin = '';
  for (const b of new Uint8Array(bytes)) bin += String.fromCharCode(b);
  return btoa(bin);
}

/** `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]` for `resource`, valid `seconds`. */
export async function sasToken(resource, key, policy, seconds = 3600) {
  const expiry = Math.floor(Date.now() / 1000) + seconds;
  const sr = encodeURIComponent(resource);
  const cryptoKey = await crypto.subtle.importKey(
    'raw', base64ToBytes(key), { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  const sig = await crypto.subtle.sign('HMAC', cryptoKey, new TextEncoder().encode(`${sr}\n${expiry}`));
  let token = `SharedAccessSignature sr=${sr}&sig=${encodeURIComponent(bytesToBase64(sig))}&se=${expiry}`;
  if (policy) token += `&skn=${encodeURIComponent(policy)}`;
  return { token, expiry };
}

/** A random 256-bit key, base64, as IoT Hub generates device keys. */
export function randomKey() {
  const bytes = new Uint8Array(32);
  crypto.getRandomValues(bytes);
  return bytesToBase64(bytes);
}
