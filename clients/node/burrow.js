'use strict';
// A Burrow client for Node.js, written from docs/protocol.md and schemas/ alone.
// Calls (direct reply-to), submits with results, events out and in, typed errors.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const amqp = require('amqplib');

const NAMESPACE_RE = /^[a-z][a-z0-9_-]{0,62}$/;
const ROUTE_RE = /^[a-z][a-z0-9_]{0,62}\.[a-z][a-z0-9_]{0,62}$/;
const JOB_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
const EVENT_NAME_RE = /^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/;
const PATTERN_RE = /^([A-Za-z0-9_-]+|\*|#)(\.([A-Za-z0-9_-]+|\*|#))*$/;
const REPLY_TO = 'amq.rabbitmq.reply-to';
const JSON_TYPE = 'application/json';

// Error codes and their default retryability (protocol §11).
const CODES = {
  INVALID_ARGUMENT: false,
  FAILED_PRECONDITION: false,
  NOT_FOUND: false,
  PERMISSION_DENIED: false,
  DEADLINE_EXCEEDED: true,
  RESOURCE_EXHAUSTED: true,
  UNAVAILABLE: true,
  INTERNAL: false,
};

class BurrowError extends Error {
  constructor(code, message, details = {}, retryable = CODES[code] ?? false) {
    super(message);
    this.name = 'BurrowError';
    this.code = code;
    this.details = details;
    this.retryable = retryable;
  }

  toJSON() {
    return { code: this.code, message: this.message, details: this.details, retryable: this.retryable };
  }
}

// One subclass per wire code, so callers can use instanceof as well as .code.
const errorClasses = {};
for (const code of Object.keys(CODES)) {
  const name = code
    .toLowerCase()
    .split('_')
    .map((w) => w[0].toUpperCase() + w.slice(1))
    .join('');
  const cls = {
    [name]: class extends BurrowError {
      constructor(message, details = {}, retryable = CODES[code]) {
        super(code, message, details, retryable);
        this.name = name;
      }
    },
  }[name];
  errorClasses[name] = cls;
  errorClasses[code] = cls;
}

function makeError(code, message, details = {}, retryable) {
  const known = code in CODES ? code : 'INTERNAL';
  return new errorClasses[known](message, details, retryable === undefined ? CODES[known] : retryable);
}

// An error body as the service sends it; an unknown code reads as INTERNAL (§11).
function errorFromBody(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    return makeError('INTERNAL', 'malformed error body', { body });
  }
  const code = typeof body.code === 'string' && body.code in CODES ? body.code : 'INTERNAL';
  const message = typeof body.message === 'string' ? body.message : String(body.message ?? '');
  const details = body.details && typeof body.details === 'object' ? body.details : {};
  const retryable = typeof body.retryable === 'boolean' ? body.retryable : CODES[code];
  return makeError(code, message, details, retryable);
}

// W3C trace context (§3): continue the given trace with a new span, or start a new trace.
function traceparent(parent) {
  const span = crypto.randomBytes(8).toString('hex');
  if (typeof parent === 'string' && /^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/.test(parent)) {
    return `${parent.slice(0, 36)}${span}${parent.slice(52)}`;
  }
  return `00-${crypto.randomBytes(16).toString('hex')}-${span}-01`;
}

function newId() {
  return crypto.randomUUID().replace(/-/g, '');
}

function headerString(value) {
  if (typeof value === 'string') return value;
  if (Buffer.isBuffer(value)) return value.toString('utf8');
  return undefined;
}

function decodeJson(msg) {
  const type = (msg.properties.contentType || '').split(';')[0].trim().toLowerCase();
  if (type && type !== JSON_TYPE) {
    throw makeError('INVALID_ARGUMENT', `unsupported content type ${type}`, { content_type: type });
  }
  try {
    return JSON.parse(msg.content.toString('utf8'));
  } catch (err) {
    throw makeError('INVALID_ARGUMENT', 'body is not JSON', { reason: 'json' });
  }
}

// The body of a reply or completion, or its error (x-status: error, §5.1 step 6).
function outcome(msg) {
  const status = headerString((msg.properties.headers || {})['x-status']);
  const body = decodeJson(msg);
  if (status === 'error') return { error: errorFromBody(body) };
  return { value: body };
}

// A small JSON Schema (2020-12) checker for what schemas/ uses; errors shaped like the service's.
function checkSchema(schema, value, loc, errors) {
  const at = loc.join('.');
  if (schema.enum && !schema.enum.some((v) => JSON.stringify(v) === JSON.stringify(value))) {
    errors.push({ loc: at, msg: `Input should be one of ${JSON.stringify(schema.enum)}`, type: 'enum' });
    return;
  }
  const types = schema.type === undefined ? [] : [].concat(schema.type);
  if (types.length && !types.some((t) => isType(t, value))) {
    errors.push({ loc: at, msg: `Input should be of type ${types.join(' or ')}`, type: `${types[0]}_type` });
    return;
  }
  if (typeof value === 'number') {
    if (schema.minimum !== undefined && value < schema.minimum) {
      errors.push({ loc: at, msg: `Input should be >= ${schema.minimum}`, type: 'greater_than_equal' });
    }
    if (schema.maximum !== undefined && value > schema.maximum) {
      errors.push({ loc: at, msg: `Input should be <= ${schema.maximum}`, type: 'less_than_equal' });
    }
  }
  if (typeof value === 'string') {
    if (schema.maxLength !== undefined && [...value].length > schema.maxLength) {
      errors.push({ loc: at, msg: `At most ${schema.maxLength} characters`, type: 'string_too_long' });
    }
    if (schema.minLength !== undefined && [...value].length < schema.minLength) {
      errors.push({ loc: at, msg: `At least ${schema.minLength} characters`, type: 'string_too_short' });
    }
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, 'u').test(value)) {
      errors.push({ loc: at, msg: `Should match ${schema.pattern}`, type: 'string_pattern_mismatch' });
    }
  }
  if (Array.isArray(value) && schema.items) {
    value.forEach((item, i) => checkSchema(schema.items, item, [...loc, String(i)], errors));
  }
  if (isType('object', value)) {
    const props = schema.properties || {};
    for (const name of schema.required || []) {
      if (!(name in value)) errors.push({ loc: [...loc, name].join('.'), msg: 'Field required', type: 'missing' });
    }
    for (const [name, item] of Object.entries(value)) {
      if (name in props) checkSchema(props[name], item, [...loc, name], errors);
      else if (schema.additionalProperties === false) {
        errors.push({ loc: [...loc, name].join('.'), msg: 'Extra inputs are not permitted', type: 'extra_forbidden' });
      }
    }
  }
}

function isType(type, value) {
  switch (type) {
    case 'object':
      return value !== null && typeof value === 'object' && !Array.isArray(value);
    case 'array':
      return Array.isArray(value);
    case 'string':
      return typeof value === 'string';
    case 'integer':
      return Number.isInteger(value);
    case 'number':
      return typeof value === 'number' && Number.isFinite(value);
    case 'boolean':
      return typeof value === 'boolean';
    case 'null':
      return value === null;
    default:
      return true;
  }
}

/** Check `value` against a JSON Schema; throws InvalidArgument shaped like the service's (§11). */
function validate(schema, value) {
  const errors = [];
  checkSchema(schema, value, [], errors);
  if (errors.length) {
    throw makeError('INVALID_ARGUMENT', `request does not match the schema (${errors.length} error(s))`, {
      reason: 'schema',
      errors: errors.slice(0, 20),
    });
  }
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

class Client {
  constructor(connection, options) {
    this.connection = connection;
    this.namespace = options.namespace;
    this.defaultTimeoutMs = options.defaultTimeoutMs ?? 30000;
    this.jobResultTtlMs = options.jobResultTtlMs ?? 86400000;
    this.maxBodyBytes = options.maxBodyBytes ?? 1048576;
    this.contractVersion = options.contractVersion;
    this.schemasDir = options.schemasDir;
    this.schemaCache = new Map();
    this.channel = null; // the confirm channel: publishes and direct reply-to
    this.channelReady = null;
    this.pending = new Map(); // correlation id -> deferred of a call
    this.publishes = new Map(); // message id -> {returned} of an unconfirmed mandatory publish
    this.subscriptions = new Set();
    this.closed = false;
    this.lateReplies = 0;
    connection.on('error', () => {}); // 'close' follows and carries the consequence
    connection.on('close', () => this.lost('connection closed'));
  }

  lost(reason) {
    this.channel = null;
    this.channelReady = null;
    this.lastLoss = reason;
    const err = makeError('UNAVAILABLE', reason);
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
  }

  // The confirm channel, opened (again) on demand: a 404 on publish closes it (§1.2).
  async confirmChannel() {
    if (this.closed) throw makeError('UNAVAILABLE', 'client is closed');
    if (!this.channelReady) {
      this.channelReady = (async () => {
        const ch = await this.connection.createConfirmChannel();
        let why = 'channel closed';
        this.lastLoss = null;
        // e.g. 404 when <ns>.rpc does not exist: no service has ever declared it (§1.2).
        ch.on('error', (err) => {
          why = `channel closed by the broker: ${err.message}`;
          this.lastLoss = why; // amqplib fails unconfirmed publishes before 'close' listeners run
        });
        ch.on('close', () => {
          if (this.channel === ch) this.lost(why);
        });
        ch.on('return', (msg) => {
          const id = msg.properties.messageId || msg.properties.correlationId;
          const entry = this.publishes.get(id);
          if (entry) entry.returned = msg.fields;
        });
        // The reply consumer must exist before the first publish that names it (§5.1 step 2).
        await ch.consume(REPLY_TO, (msg) => this.onReply(msg), { noAck: true });
        this.channel = ch;
        return ch;
      })();
      this.channelReady.catch(() => {
        this.channelReady = null;
      });
    }
    return this.channelReady;
  }

  onReply(msg) {
    if (!msg) return;
    const waiter = this.pending.get(msg.properties.correlationId);
    if (!waiter) {
      this.lateReplies += 1; // late, duplicate or unknown (§5.1 step 5)
      return;
    }
    this.pending.delete(msg.properties.correlationId);
    try {
      const result = outcome(msg);
      if (result.error) waiter.reject(result.error);
      else waiter.resolve(result.value);
    } catch (err) {
      waiter.reject(err);
    }
  }

  encode(payload) {
    const body = Buffer.from(JSON.stringify(payload), 'utf8');
    if (body.length > this.maxBodyBytes) {
      throw makeError('INVALID_ARGUMENT', 'body too large', { limit: this.maxBodyBytes, size: body.length });
    }
    return body;
  }

  schema(file) {
    if (!this.schemasDir) return null;
    if (!this.schemaCache.has(file)) {
      const full = path.join(this.schemasDir, file);
      this.schemaCache.set(file, fs.existsSync(full) ? JSON.parse(fs.readFileSync(full, 'utf8')) : null);
    }
    return this.schemaCache.get(file);
  }

  checkRequest(route, payload) {
    const schema = this.schema(`${route}.request.json`);
    if (schema) validate(schema, payload);
  }

  // Publish with confirms; resolves 'ok' or 'returned', rejects with a BurrowError (§5.1 step 4).
  async publish(exchange, key, body, props) {
    const ch = await this.confirmChannel();
    const entry = { returned: null };
    const id = props.messageId;
    if (props.mandatory) this.publishes.set(id, entry);
    try {
      await new Promise((resolve, reject) => {
        const onClose = () => reject(makeError('UNAVAILABLE', this.lastLoss || 'channel closed'));
        ch.once('close', onClose);
        ch.publish(exchange, key, body, props, (err) => {
          ch.removeListener('close', onClose);
          // amqplib fails unconfirmed publishes with 'channel closed' too; only a nack is a refusal.
          if (err && err.message === 'message nacked') {
            reject(makeError('RESOURCE_EXHAUSTED', 'the broker refused the message (nack)'));
          } else if (err) reject(makeError('UNAVAILABLE', this.lastLoss || 'channel closed'));
          else resolve();
        });
      });
    } finally {
      this.publishes.delete(id);
    }
    return entry.returned ? 'returned' : 'ok';
  }

  headers(extra, options = {}) {
    const headers = { traceparent: traceparent(options.traceparent), ...extra };
    if (this.contractVersion !== undefined) headers['x-contract-version'] = String(this.contractVersion);
    return headers;
  }

  /** Call `<svc>.<op>` and wait for its reply; rejects with a BurrowError. */
  async call(route, payload, options = {}) {
    if (!ROUTE_RE.test(route)) throw makeError('INVALID_ARGUMENT', `bad route ${route}`, { route });
    if (options.validate !== false) this.checkRequest(route, payload);
    const body = this.encode(payload);
    const timeoutMs = Math.max(1, Math.ceil(options.timeoutMs ?? this.defaultTimeoutMs));
    const id = newId();
    const waiter = deferred();
    this.pending.set(id, waiter);
    const timer = setTimeout(() => {
      this.pending.delete(id);
      waiter.reject(makeError('DEADLINE_EXCEEDED', `no reply within ${timeoutMs} ms`, { timeout_ms: timeoutMs }));
    }, timeoutMs);
    try {
      const published = this.publish(`${this.namespace}.rpc`, route, body, {
        mandatory: true,
        type: route,
        replyTo: REPLY_TO,
        correlationId: id,
        messageId: id,
        contentType: JSON_TYPE,
        deliveryMode: 1,
        expiration: String(timeoutMs),
        headers: this.headers({ 'x-deadline': Math.floor(Date.now() + timeoutMs), 'x-burrow-kind': 'call' }, options),
      });
      // One timer covers publish and wait: a confirm that never comes ends at the deadline too.
      const state = await Promise.race([published, waiter.promise.then(() => 'replied')]);
      if (state === 'returned') {
        throw makeError('NOT_FOUND', `no service is bound for ${route}`, { route });
      }
      return await waiter.promise;
    } finally {
      clearTimeout(timer);
      this.pending.delete(id);
    }
  }

  /** Publish to `<ns>.commands` without waiting for a result; resolves the message id. */
  async cast(route, payload, options = {}) {
    return this.command(route, payload, 'cast', options);
  }

  /** Submit a job; declares `<ns>.job.<id>` first and resolves the job id (§7.1). */
  async submit(route, payload, options = {}) {
    const jobId = options.jobId ?? newId();
    if (!JOB_ID_RE.test(jobId)) throw makeError('INVALID_ARGUMENT', 'bad job id', { job_id: jobId });
    if (options.callbackRoute !== undefined && !this.isCallbackRoute(options.callbackRoute)) {
      throw makeError('INVALID_ARGUMENT', 'bad callback route', { callback_route: options.callbackRoute });
    }
    await this.onSpareChannel((ch) =>
      ch.assertQueue(this.jobQueue(jobId), {
        durable: true,
        arguments: { 'x-queue-type': 'classic', 'x-expires': Math.max(1000, Math.floor(this.jobResultTtlMs)) },
      }),
    );
    try {
      return await this.command(route, payload, 'submit', { ...options, jobId });
    } catch (err) {
      // Nobody will complete this job: do not leave its result queue behind (§7.1).
      await this.forget(jobId).catch(() => {});
      throw err;
    }
  }

  isCallbackRoute(key) {
    return typeof key === 'string' && key.length <= 255 && EVENT_NAME_RE.test(key) && key.split('.').length <= 16;
  }

  async command(route, payload, kind, options) {
    if (!ROUTE_RE.test(route)) throw makeError('INVALID_ARGUMENT', `bad route ${route}`, { route });
    if (options.validate !== false) this.checkRequest(route, payload);
    const body = this.encode(payload);
    const messageId = kind === 'submit' ? options.jobId : newId();
    const extra = { 'x-burrow-kind': kind };
    if (kind === 'submit') extra['x-job-id'] = options.jobId;
    if (options.callbackRoute !== undefined) extra['x-callback-route'] = options.callbackRoute;
    const state = await this.publish(`${this.namespace}.commands`, route, body, {
      mandatory: true,
      type: route,
      messageId,
      contentType: JSON_TYPE,
      deliveryMode: 2,
      headers: this.headers(extra, options),
    });
    if (state === 'returned') throw makeError('NOT_FOUND', `no service is bound for ${route}`, { route });
    return messageId;
  }

  jobQueue(jobId) {
    return `${this.namespace}.job.${jobId}`;
  }

  async onSpareChannel(fn) {
    if (this.closed) throw makeError('UNAVAILABLE', 'client is closed');
    let ch;
    try {
      ch = await this.connection.createChannel();
    } catch (err) {
      throw makeError('UNAVAILABLE', `cannot open a channel: ${err.message}`);
    }
    ch.on('error', () => {}); // a 404/406 closes the spare channel only; the promise carries it
    try {
      return await fn(ch);
    } finally {
      try {
        await ch.close();
      } catch {
        // already closed by the broker
      }
    }
  }

  /**
   * Wait for a job's result in its queue (§7.3). By default the result stays for other readers;
   * with `{forget: true}` it is acked and the job queue deleted.
   */
  async result(jobId, options = {}) {
    if (!JOB_ID_RE.test(jobId)) throw makeError('INVALID_ARGUMENT', 'bad job id', { job_id: jobId });
    const timeoutMs = options.timeoutMs ?? this.defaultTimeoutMs;
    const queue = this.jobQueue(jobId);
    return this.onSpareChannel(async (ch) => {
      try {
        await ch.checkQueue(queue);
      } catch (err) {
        throw makeError('NOT_FOUND', `unknown job or expired result: ${jobId}`, { job_id: jobId });
      }
      const got = deferred();
      const closed = () => got.reject(makeError('UNAVAILABLE', 'channel closed while waiting for the result'));
      ch.once('close', closed);
      await ch.prefetch(1);
      const { consumerTag } = await ch.consume(queue, (msg) => msg && got.resolve(msg), { noAck: false });
      const timer = setTimeout(
        () => got.reject(makeError('DEADLINE_EXCEEDED', `job ${jobId} not done within ${timeoutMs} ms`)),
        timeoutMs,
      );
      try {
        const msg = await got.promise;
        const result = outcome(msg);
        if (options.forget) {
          ch.ack(msg);
          await ch.cancel(consumerTag);
          await ch.deleteQueue(queue);
        }
        // Without forget the unacked message returns to the queue when the channel closes.
        if (result.error) throw result.error;
        return result.value;
      } finally {
        clearTimeout(timer);
        ch.removeListener('close', closed);
      }
    });
  }

  /** Delete a job's result queue. */
  async forget(jobId) {
    await this.onSpareChannel((ch) => ch.deleteQueue(this.jobQueue(jobId)));
  }

  /** Publish an event with confirms; resolves false when no subscriber queue matched (§13). */
  async emit(event, payload, options = {}) {
    if (!EVENT_NAME_RE.test(event)) throw makeError('INVALID_ARGUMENT', `bad event name ${event}`, { event });
    if (options.validate !== false) {
      const schema = this.schema(`event.${event}.json`);
      if (schema) validate(schema, payload);
    }
    const body = this.encode(payload);
    const messageId = newId();
    const state = await this.publish(`${this.namespace}.events`, event, body, {
      mandatory: true,
      type: event,
      messageId,
      contentType: JSON_TYPE,
      deliveryMode: 2,
      headers: { traceparent: traceparent(options.traceparent), ...(options.headers || {}) },
    });
    return state === 'ok';
  }

  /**
   * Subscribe a handler to events matching a topic pattern, through a queue of this client's own
   * (server-named, exclusive, auto-delete). The handler gets (payload, meta); meta.error is set
   * for failed completions. Resolves a Subscription with .queue and .cancel().
   */
  async subscribe(pattern, handler, options = {}) {
    if (!PATTERN_RE.test(pattern)) throw makeError('INVALID_ARGUMENT', `bad pattern ${pattern}`, { pattern });
    if (this.closed) throw makeError('UNAVAILABLE', 'client is closed');
    const exchange = `${this.namespace}.events`;
    const ch = await this.connection.createChannel();
    ch.on('error', () => {});
    try {
      // Same type and flags as the service declares it, so this is harmless (§1.2).
      await ch.assertExchange(exchange, 'topic', { durable: true, autoDelete: false, internal: false });
      const { queue } = await ch.assertQueue('', { exclusive: true, autoDelete: true, durable: false });
      await ch.bindQueue(queue, exchange, pattern);
      await ch.prefetch(options.prefetch ?? 16);
      const subscription = new Subscription(this, ch, queue, pattern);
      const { consumerTag } = await ch.consume(queue, (msg) => subscription.deliver(msg, handler), { noAck: false });
      subscription.consumerTag = consumerTag;
      this.subscriptions.add(subscription);
      return subscription;
    } catch (err) {
      await ch.close().catch(() => {});
      throw err instanceof BurrowError ? err : makeError('UNAVAILABLE', `cannot subscribe: ${err.message}`);
    }
  }

  /** Close channels and the connection; own queues are exclusive or auto-delete, so go with it. */
  async close() {
    if (this.closed) return;
    for (const subscription of [...this.subscriptions]) await subscription.cancel();
    this.closed = true;
    this.lost('client closed');
    try {
      await this.connection.close();
    } catch {
      // already closed
    }
  }
}

class Subscription {
  constructor(client, channel, queue, pattern) {
    this.client = client;
    this.channel = channel;
    this.queue = queue;
    this.pattern = pattern;
    this.consumerTag = null;
  }

  async deliver(msg, handler) {
    if (!msg) return; // the broker cancelled the consumer
    const headers = msg.properties.headers || {};
    const meta = {
      name: msg.properties.type || msg.fields.routingKey,
      routingKey: msg.fields.routingKey,
      messageId: msg.properties.messageId,
      correlationId: msg.properties.correlationId,
      jobId: headerString(headers['x-job-id']),
      status: headerString(headers['x-status']),
      traceparent: headerString(headers.traceparent),
      headers,
      error: null,
    };
    let payload;
    try {
      const result = outcome(msg);
      payload = result.value;
      if (result.error) {
        meta.error = result.error;
        payload = result.error.toJSON();
      }
    } catch (err) {
      // Not JSON: nobody can use it and this queue has no dead-letter exchange.
      this.channel.nack(msg, false, false);
      return;
    }
    try {
      await handler(payload, meta);
      this.channel.ack(msg);
    } catch (err) {
      this.channel.nack(msg, false, false);
    }
  }

  async cancel() {
    this.client.subscriptions.delete(this);
    try {
      if (this.consumerTag) await this.channel.cancel(this.consumerTag);
      await this.channel.close();
    } catch {
      // the channel or connection is already gone
    }
  }
}

/**
 * Connect to RabbitMQ. options: namespace (default BURROW_NAMESPACE or 'burrow'), defaultTimeoutMs,
 * jobResultTtlMs, maxBodyBytes, contractVersion, schemasDir (validate requests/events before publishing).
 */
async function connect(url, options = {}) {
  const namespace = options.namespace ?? process.env.BURROW_NAMESPACE ?? 'burrow';
  if (!NAMESPACE_RE.test(namespace)) {
    throw makeError('INVALID_ARGUMENT', `bad namespace ${namespace}`, { namespace });
  }
  let connection;
  try {
    connection = await amqp.connect(url ?? process.env.BURROW_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/');
  } catch (err) {
    throw makeError('UNAVAILABLE', `cannot connect: ${err.message}`);
  }
  const client = new Client(connection, { ...options, namespace });
  try {
    await client.confirmChannel();
  } catch (err) {
    await connection.close().catch(() => {});
    throw makeError('UNAVAILABLE', `cannot open a channel: ${err.message}`);
  }
  return client;
}

module.exports = {
  connect,
  Client,
  Subscription,
  BurrowError,
  errors: errorClasses,
  errorFromBody,
  validate,
  CODES,
};
