// A device on the HTTPS transport of the official Node device SDK (azure-iot-device Client with
// azure-iot-device-http's Http, unchanged): the transport IoT Hub offers devices behind
// firewalls that allow only 443.
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node http_device.mjs '<HostName=...;DeviceId=...;SharedAccessKey=...>' \
//       [--send-event JSON]... [--receive N] [--quiet S] [--interval S] [--timeout S]
//
// --send-event {"body", "messageId"?, "correlationId"?, "contentType"?, "contentEncoding"?,
// "properties"? {k: v}} sends one device-to-cloud message with `client.sendEvent` (POST
// /devices/{id}/messages/events), in the order given, before anything is received.
//
// --receive N listens with `client.on('message')` (the SDK polls GET
// /devices/{id}/messages/devicebound every --interval seconds, through
// `setOptions({http: {receivePolicy: {interval}}})`) and settles each message by its
// application property `action` (which this transport hands over as `iothub-app-action`):
// `complete` (DELETE .../{lockToken}), `reject` (DELETE .../{lockToken}?reject) or `abandon`
// (POST .../{lockToken}/abandon); no action means complete. After N messages it keeps
// listening for --quiet seconds (anything more is printed too), then closes.
//
// Prints JSON lines: {"type":"sent"|"send-error"}, {"type":"message"} per received message,
// {"type":"settled"} per settlement, {"type":"error"} for errors the client emits, and a final
// {"type":"done","reason"} or {"type":"fatal"}. Exit codes: 0 done, 2 timeout, 1 error.

import { parseArgs } from "node:util";
import { emit, requireLocked } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    "send-event": { type: "string", multiple: true, default: [] },
    receive: { type: "string", default: "0" },
    quiet: { type: "string", default: "0" },
    interval: { type: "string", default: "0.2" },
    timeout: { type: "string", default: "30" },
  },
});
if (positionals.length !== 1) {
  process.stderr.write("usage: node http_device.mjs <device connection string> [--send-event JSON]... [--receive N] [--quiet S] [--interval S] [--timeout S]\n");
  process.exit(64);
}

const { Client, Message } = requireLocked("azure-iot-device");
const { Http } = requireLocked("azure-iot-device-http");
const { NoRetry } = requireLocked("azure-iot-common");

/** An SDK error as a JSON line, with the HTTP answer the transport attached to it. */
function sdkError(err) {
  const res = err?.response;
  return {
    name: err?.name ?? null,
    constructorName: err?.constructor?.name ?? null,
    message: err?.message ?? String(err),
    statusCode: res?.statusCode ?? null,
    responseHeaders: res?.headers ?? null,
    responseBody: err?.responseBody ?? null,
  };
}

function properties(msg) {
  const out = {};
  for (let i = 0; i < msg.properties.count(); i++) {
    const item = msg.properties.getItem(i);
    out[item.key] = item.value;
  }
  return out;
}

const wanted = Number(values.receive);
const timeoutMs = Number(values.timeout) * 1000;
const client = Client.fromConnectionString(positionals[0], Http);
client.setRetryPolicy(new NoRetry());
client.on("error", (err) => emit({ type: "error", ...sdkError(err) }));

let finish;
const finished = new Promise((resolve) => {
  finish = resolve;
});
const timer = setTimeout(() => finish("timeout"), timeoutMs);

let rc = 0;
try {
  await client.open();
  for (const text of values["send-event"]) {
    const spec = JSON.parse(text);
    const m = new Message(spec.body ?? "");
    if (spec.messageId !== undefined) m.messageId = spec.messageId;
    if (spec.correlationId !== undefined) m.correlationId = spec.correlationId;
    if (spec.contentType !== undefined) m.contentType = spec.contentType;
    if (spec.contentEncoding !== undefined) m.contentEncoding = spec.contentEncoding;
    for (const [k, v] of Object.entries(spec.properties ?? {})) m.properties.add(k, v);
    try {
      const { transportObj } = await client.sendEvent(m);
      emit({ type: "sent", messageId: spec.messageId ?? null, statusCode: transportObj?.statusCode ?? null });
    } catch (err) {
      emit({ type: "send-error", messageId: spec.messageId ?? null, ...sdkError(err) });
    }
  }
  if (wanted > 0) {
    let received = 0;
    let quietTimer = null;
    await client.setOptions({ http: { receivePolicy: { interval: Number(values.interval) } } });
    client.on("message", (msg) => {
      received += 1;
      const props = properties(msg);
      const action = props["iothub-app-action"] ?? props.action ?? "complete";
      emit({
        type: "message",
        n: received,
        data: msg.data === undefined ? null : Buffer.from(msg.data).toString("utf8"),
        messageId: msg.messageId ?? null,
        correlationId: msg.correlationId ?? null,
        to: msg.to ?? null,
        expiryTimeUtc: msg.expiryTimeUtc ?? null,
        lockToken: msg.lockToken ?? null,
        properties: props,
      });
      const settle = { complete: client.complete, reject: client.reject, abandon: client.abandon }[action];
      if (!settle) {
        emit({ type: "error", message: `unknown action ${action}` });
        return;
      }
      settle
        .call(client, msg)
        .then(() => emit({ type: "settled", action, messageId: msg.messageId ?? null, lockToken: msg.lockToken ?? null, ok: true }))
        .catch((err) => emit({ type: "settled", action, messageId: msg.messageId ?? null, lockToken: msg.lockToken ?? null, ok: false, ...sdkError(err) }));
      if (received >= wanted && quietTimer === null) {
        quietTimer = setTimeout(() => finish("received"), Number(values.quiet) * 1000);
      }
    });
  } else {
    finish("sent");
  }
  const why = await finished;
  emit({ type: "done", reason: why });
  rc = why === "timeout" ? 2 : 0;
} catch (err) {
  emit({ type: "fatal", ...sdkError(err) });
  process.stderr.write(`http_device: ${err?.stack ?? err}\n`);
  rc = 1;
} finally {
  clearTimeout(timer);
  await client.close().catch(() => {});
}
process.exit(rc);
