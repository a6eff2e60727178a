// Sends cloud-to-device messages and reads delivery feedback with the official Node service SDK
// (azure-iothub Client, unchanged) over AMQP/TLS (`Amqp`, port 5671) or AMQP over WebSockets
// (`AmqpWs`, wss://<host>:443/$iothub/websocket).
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> NODE_EXTRA_CA_CERTS=<hub ca.pem> \
//     node c2d_service.mjs '<HostName=...;SharedAccessKeyName=...;SharedAccessKey=...>' \
//       --send '<JSON array of messages>' [--feedback-for MESSAGE_ID]... [--websockets] [--timeout S]
//
// Each message of --send is {"device", "body", "messageId"?, "correlationId"?, "contentType"?,
// "contentEncoding"?, "ack"?, "expiryTimeUtc"? (ms since the epoch), "properties"? {k: v}}; they
// are sent in order, one `client.send` at a time. With --feedback-for, `getFeedbackReceiver()`
// is attached before the first send, every feedback message is completed, and the program waits
// until a record for each given message id has arrived (or the timeout).
//
// Prints JSON lines: {"type":"sent"} or {"type":"send-error"} per message, {"type":"feedback"}
// per feedback message (its records parsed from the body), {"type":"error"} for receiver
// errors, a final {"type":"done","reason"} or {"type":"fatal"}. The retry policy is NoRetry,
// so an error shows at once instead of being retried for four minutes. Exit codes: 0 when
// everything was sent (or refused) and all feedback came, 2 on timeout, 1 on other errors.

import { parseArgs } from "node:util";
import { emit, requireLocked } from "./lib.mjs";

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    send: { type: "string", default: "[]" },
    "feedback-for": { type: "string", multiple: true, default: [] },
    websockets: { type: "boolean", default: false },
    timeout: { type: "string", default: "30" },
  },
});
if (positionals.length !== 1) {
  process.stderr.write("usage: node c2d_service.mjs <service connection string> --send JSON [--feedback-for ID]... [--websockets] [--timeout S]\n");
  process.exit(64);
}

const { Client, Amqp, AmqpWs } = requireLocked("azure-iothub");
const { Message, NoRetry } = requireLocked("azure-iot-common");

/** An SDK error as a JSON line: its class, message, and the AMQP error it was made from. */
function sdkError(err) {
  const amqp = err?.amqpError ?? null;
  return {
    name: err?.name ?? null,
    constructorName: err?.constructor?.name ?? null,
    message: err?.message ?? String(err),
    amqpCondition: amqp?.condition ?? err?.condition ?? null,
    amqpDescription: amqp?.description ?? err?.description ?? null,
  };
}

function toMessage(spec) {
  const m = new Message(spec.body ?? "");
  if (spec.messageId !== undefined) m.messageId = spec.messageId;
  if (spec.correlationId !== undefined) m.correlationId = spec.correlationId;
  if (spec.contentType !== undefined) m.contentType = spec.contentType;
  if (spec.contentEncoding !== undefined) m.contentEncoding = spec.contentEncoding;
  if (spec.ack !== undefined) m.ack = spec.ack;
  if (spec.expiryTimeUtc !== undefined) m.expiryTimeUtc = spec.expiryTimeUtc;
  for (const [k, v] of Object.entries(spec.properties ?? {})) m.properties.add(k, v);
  return m;
}

const specs = JSON.parse(values.send);
const waitFor = new Set(values["feedback-for"]);
const timeoutMs = Number(values.timeout) * 1000;
const client = Client.fromConnectionString(positionals[0], values.websockets ? AmqpWs : Amqp);
client.setRetryPolicy(new NoRetry());

let finish;
const finished = new Promise((resolve) => {
  finish = resolve;
});
const timer = setTimeout(() => finish("timeout"), timeoutMs);

let rc = 0;
try {
  await client.open();
  if (waitFor.size > 0) {
    const { result: receiver } = await client.getFeedbackReceiver();
    receiver.on("error", (err) => emit({ type: "error", stage: "feedback", ...sdkError(err) }));
    receiver.on("message", (msg) => {
      const text = msg.data === undefined ? null : Buffer.from(msg.data).toString("utf8");
      let records = null;
      let parseError = null;
      try {
        records = JSON.parse(text);
      } catch (e) {
        parseError = String(e);
      }
      emit({
        type: "feedback",
        contentType: msg.contentType ?? null,
        messageId: msg.messageId ?? null,
        body: text,
        records,
        parseError,
      });
      receiver.complete(msg).catch((err) => emit({ type: "error", stage: "feedback-complete", ...sdkError(err) }));
      for (const r of Array.isArray(records) ? records : []) waitFor.delete(r?.originalMessageId);
      if (waitFor.size === 0) finish("feedback");
    });
  }
  for (const spec of specs) {
    try {
      await client.send(spec.device, toMessage(spec));
      emit({ type: "sent", device: spec.device, messageId: spec.messageId ?? null });
    } catch (err) {
      emit({ type: "send-error", device: spec.device, messageId: spec.messageId ?? null, ...sdkError(err) });
    }
  }
  if (waitFor.size === 0) finish("sent");
  const why = await finished;
  emit({ type: "done", reason: why, missingFeedback: [...waitFor] });
  rc = why === "timeout" ? 2 : 0;
} catch (err) {
  emit({ type: "fatal", ...sdkError(err) });
  process.stderr.write(`c2d_service: ${err?.stack ?? err}\n`);
  rc = 1;
} finally {
  clearTimeout(timer);
  await client.close().catch(() => {});
}
process.exit(rc);
