'use strict';
// A Burrow client for Node.js, written from docs/protocol.md and schemas/ alone.
// Calls (direct reply-to), submits with pushed or polled results, events out and in, typed errors.

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
// Pauses between `result` calls while a job runs (§7.3): 50 ms, doubling up to 1 s.
const FIRST_PAUSE_MS = 50;
const MAX_PAUSE_MS = 1000;
// A result read gets the time left to the caller's deadline, but at least this much.
const MIN_READ_MS = 100;
const JOB_STATES = new Set(['running', 'completed', 'failed']);

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

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
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
    // Jobs submitted by this client: job id -> {route, channel, push, outcome, timer} (see submit).
    this.jobs = new Map();
    this.subscriptions = new Set();
    this.closed = false;
    this.broken = false; // the connection is gone: nothing on it can work again
    this.lateReplies = 0;
    connection.on('error', () => {}); // 'close' follows and carries the consequence
    connection.on('close', () => {
      this.broken = true;
      this.lost('connection closed');
    });
  }

  lost(reason) {
    this.channel = null;
    this.channelReady = null;
    this.lastLoss = reason;
    const err = makeError('UNAVAILABLE', reason);
    for (const waiter of this.pending.values()) waiter.reject(err);
    this.pending.clear();
    // The reply address of that channel is gone: no pushed completion can arrive any more (§7.1).
    // Their results are read with `result` calls from now on.
    for (const entry of this.jobs.values()) {
      if (entry.channel !== null && entry.outcome === null) {
        entry.channel = null;
        entry.push.resolve(null);
      }
    }
  }

  // The confirm channel, opened (again) on demand: a 404 on publish closes it (§1.2).
  async confirmChannel() {
    if (this.closed) throw makeError('UNAVAILABLE', 'client is closed');
    if (this.broken) throw makeError('UNAVAILABLE', this.lastLoss || 'connection closed');
    if (!this.channelReady) {
      this.channelReady = (async () => {
        let ch;
        try {
          ch = await this.connection.createConfirmChannel();
        } catch (err) {
          throw makeError('UNAVAILABLE', `cannot open a channel: ${err.message}`);
        }
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
        await ch.consume(REPLY_TO, (msg) => this.onReply(msg, ch), { noAck: true });
        this.channel = ch;
        return ch;
      })();
      this.channelReady.catch(() => {
        this.channelReady = null;
      });
    }
    return this.channelReady;
  }

  // Replies to calls and completions of jobs submitted on `ch` share the reply consumer (§7.1).
  onReply(msg, ch) {
    if (!msg) return;
    const id = msg.properties.correlationId;
    const waiter = this.pending.get(id);
    if (!waiter) {
      const entry = this.jobs.get(id);
      if (entry && entry.channel === ch && entry.outcome === null) {
        this.completed(id, entry, msg);
        return;
      }
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
  // `onChannel(ch)` runs just before the publish, on the channel that carries it. No confirm
  // within `confirmTimeoutMs` (default: defaultTimeoutMs) is UNAVAILABLE: it may or may not be taken.
  async publish(exchange, key, body, props, { onChannel, confirmTimeoutMs } = {}) {
    const ch = await this.confirmChannel();
    const entry = { returned: null };
    const id = props.messageId;
    const waitMs = Math.max(1, Math.ceil(confirmTimeoutMs ?? this.defaultTimeoutMs));
    if (props.mandatory) this.publishes.set(id, entry);
    let timer;
    let onClose;
    try {
      await new Promise((resolve, reject) => {
        onClose = () => reject(makeError('UNAVAILABLE', this.lastLoss || 'channel closed'));
        ch.once('close', onClose);
        timer = setTimeout(
          () => reject(makeError('UNAVAILABLE', `no confirm from the broker within ${waitMs} ms`)),
          waitMs,
        );
        if (onChannel) onChannel(ch);
        try {
          ch.publish(exchange, key, body, props, (err) => {
            // amqplib fails unconfirmed publishes with 'channel closed' too; only a nack is a refusal.
            if (err && err.message === 'message nacked') {
              reject(makeError('RESOURCE_EXHAUSTED', 'the broker refused the message (nack)'));
            } else if (err) reject(makeError('UNAVAILABLE', this.lastLoss || 'channel closed'));
            else resolve();
          });
        } catch (err) {
          // amqplib throws at once when the channel closed before this publish
          reject(makeError('UNAVAILABLE', this.lastLoss || `cannot publish: ${err.message}`));
        }
      });
    } finally {
      clearTimeout(timer);
      ch.removeListener('close', onClose);
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
    return this.rpc(route, body, { 'x-burrow-kind': 'call' }, options);
  }

  // One call on `<ns>.rpc` (§5.1): calls and `result` calls (§7.3) differ only in kind and body.
  async rpc(route, body, extraHeaders, options) {
    const timeoutMs = Math.max(1, Math.ceil(options.timeoutMs ?? this.defaultTimeoutMs));
    const id = newId();
    const waiter = deferred();
    this.pending.set(id, waiter);
    const timer = setTimeout(() => {
      this.pending.delete(id);
      waiter.reject(makeError('DEADLINE_EXCEEDED', `no reply within ${timeoutMs} ms`, { timeout_ms: timeoutMs }));
    }, timeoutMs);
    try {
      const props = {
        mandatory: true,
        type: route,
        replyTo: REPLY_TO,
        correlationId: id,
        messageId: id,
        contentType: JSON_TYPE,
        deliveryMode: 1,
        expiration: String(timeoutMs),
        headers: this.headers({ 'x-deadline': Math.floor(Date.now() + timeoutMs), ...extraHeaders }, options),
      };
      const published = this.publish(`${this.namespace}.rpc`, route, body, props, { confirmTimeoutMs: timeoutMs });
      published.catch(() => {}); // once the reply or the deadline came first, its outcome is moot
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

  /** Publish to `<ns>.commands` without waiting for a result; resolves the message id (§6). */
  async cast(route, payload, options = {}) {
    if (!ROUTE_RE.test(route)) throw makeError('INVALID_ARGUMENT', `bad route ${route}`, { route });
    if (options.validate !== false) this.checkRequest(route, payload);
    const body = this.encode(payload);
    const messageId = newId();
    const state = await this.publish(`${this.namespace}.commands`, route, body, {
      mandatory: true,
      type: route,
      messageId,
      contentType: JSON_TYPE,
      deliveryMode: 2,
      headers: this.headers({ 'x-burrow-kind': 'cast' }, options),
    });
    if (state === 'returned') throw makeError('NOT_FOUND', `no service is bound for ${route}`, { route });
    return messageId;
  }

  /**
   * Submit a job (§7.1): one confirmed, persistent publish to `<ns>.commands`; no queue is
   * declared. Resolves the job id once the broker confirmed it. options: jobId (default: a new
   * uuid), callbackRoute, traceparent, validate. The completion is pushed to this client's reply
   * consumer and kept until `result()` reads it.
   */
  async submit(route, payload, options = {}) {
    const jobId = options.jobId ?? newId();
    if (typeof jobId !== 'string' || !JOB_ID_RE.test(jobId)) {
      throw makeError('INVALID_ARGUMENT', 'bad job id', { job_id: jobId });
    }
    if (options.callbackRoute !== undefined && !this.isCallbackRoute(options.callbackRoute)) {
      throw makeError('INVALID_ARGUMENT', 'bad callback route', { callback_route: options.callbackRoute });
    }
    if (!ROUTE_RE.test(route)) throw makeError('INVALID_ARGUMENT', `bad route ${route}`, { route });
    if (options.validate !== false) this.checkRequest(route, payload);
    const body = this.encode(payload);
    const extra = { 'x-burrow-kind': 'submit', 'x-job-id': jobId };
    if (options.callbackRoute !== undefined) extra['x-callback-route'] = options.callbackRoute;
    // Registered before the publish: a fast job's completion may arrive before the confirm (§7.1).
    const entry = this.register(jobId, route);
    try {
      const state = await this.publish(
        `${this.namespace}.commands`,
        route,
        body,
        {
          mandatory: true,
          type: route,
          messageId: jobId,
          correlationId: jobId,
          replyTo: REPLY_TO,
          contentType: JSON_TYPE,
          deliveryMode: 2,
          headers: this.headers(extra, options),
        },
        {
          // The push reaches only the channel that published the submit.
          onChannel: (ch) => {
            entry.channel = ch;
          },
        },
      );
      if (state === 'returned') throw makeError('NOT_FOUND', `no service is bound for ${route}`, { route });
    } catch (err) {
      // Not a job (§7.1 step 2): nothing to remember.
      if (this.jobs.get(jobId) === entry) this.dropJob(jobId);
      throw err;
    }
    return jobId;
  }

  isCallbackRoute(key) {
    return typeof key === 'string' && key.length <= 255 && EVENT_NAME_RE.test(key) && key.split('.').length <= 16;
  }

  // What the client knows of a job it submitted; forgotten jobResultTtlMs after its last news.
  register(jobId, route) {
    if (this.jobs.has(jobId)) this.dropJob(jobId); // submitted again: the new submit is the one to follow
    const entry = { route, channel: null, push: deferred(), outcome: null, timer: null };
    this.jobs.set(jobId, entry);
    this.keep(jobId, entry);
    return entry;
  }

  keep(jobId, entry) {
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => {
      if (this.jobs.get(jobId) === entry) this.dropJob(jobId);
    }, Math.min(2 ** 31 - 1, Math.max(1000, Math.floor(this.jobResultTtlMs)))); // setTimeout's range
    entry.timer.unref();
  }

  dropJob(jobId) {
    const entry = this.jobs.get(jobId);
    if (!entry) return;
    this.jobs.delete(jobId);
    clearTimeout(entry.timer);
    entry.channel = null;
    entry.push.resolve(null); // a reader still waiting for the push reads the service instead
  }

  // The pushed completion (§7.2): correlation id = job id; x-status says reply or error body.
  completed(jobId, entry, msg) {
    let got;
    try {
      got = outcome(msg);
    } catch (err) {
      got = { error: err }; // not JSON: say so where the result is awaited
    }
    entry.outcome = got;
    entry.push.resolve(got);
    this.keep(jobId, entry);
  }

  /**
   * A job's result (its reply JSON), or a rejection with the job's error (a BurrowError subclass
   * by code). options: timeoutMs (default defaultTimeoutMs), route (`<svc>.<op>`, needed for a
   * job this client did not submit), forget (drop the client's copy once read).
   *
   * A job submitted by this client resolves from its pushed completion, kept until read (and
   * after, unless forget). If the push can no longer arrive (the channel or connection was
   * replaced), or the job was submitted elsewhere, the service is asked with `result` calls
   * (§7.3), 50 ms apart and doubling to 1 s, until the job completed or failed.
   * Rejects DEADLINE_EXCEEDED when the job is still running at the timeout, NOT_FOUND when no
   * service knows the job by then (never received, or its result expired).
   */
  async result(jobId, options = {}) {
    if (typeof jobId !== 'string' || !JOB_ID_RE.test(jobId)) {
      throw makeError('INVALID_ARGUMENT', 'bad job id', { job_id: jobId });
    }
    if (this.closed) throw makeError('UNAVAILABLE', 'client is closed');
    const timeoutMs = Math.max(0, options.timeoutMs ?? this.defaultTimeoutMs);
    const deadline = Date.now() + timeoutMs;
    const entry = this.jobs.get(jobId);
    let got = entry ? entry.outcome : null;
    if (entry && got === null && entry.channel !== null) {
      let timer;
      const timedOut = new Promise((resolve) => {
        timer = setTimeout(() => resolve('timeout'), timeoutMs);
      });
      const pushed = await Promise.race([entry.push.promise, timedOut]).finally(() => clearTimeout(timer));
      if (pushed === 'timeout') {
        throw makeError('DEADLINE_EXCEEDED', `job ${jobId} did not finish within ${timeoutMs} ms`, {
          job_id: jobId,
        });
      }
      got = pushed; // null: the push was lost; read the service below
    }
    if (got === null) {
      const route = entry ? entry.route : options.route;
      if (typeof route !== 'string' || !ROUTE_RE.test(route)) {
        throw makeError(
          'INVALID_ARGUMENT',
          `the result of job ${jobId}, not submitted by this client, needs options.route ('<svc>.<op>')`,
          { job_id: jobId, route: route ?? null },
        );
      }
      got = await this.poll(jobId, route, deadline, Boolean(entry));
      if (entry && this.jobs.get(jobId) === entry) {
        entry.outcome = got;
        this.keep(jobId, entry);
      }
    }
    if (options.forget) this.dropJob(jobId);
    if (got.error) throw got.error;
    return got.value;
  }

  // `result` calls until the job ended or the deadline passed; resolves {value} or {error}.
  async poll(jobId, route, deadline, submittedHere) {
    let seen = submittedHere; // our own confirmed submit exists, even if not received yet
    let pause = FIRST_PAUSE_MS;
    let lastError = null;
    for (;;) {
      try {
        const record = await this.readJob(jobId, route, Math.max(MIN_READ_MS, deadline - Date.now()));
        lastError = null;
        if (record !== null) {
          if (record.state === 'completed') return { value: record.result };
          if (record.state === 'failed') return { error: errorFromBody(record.error) };
          seen = true;
        }
      } catch (err) {
        // A retryable failure of one read (store away, queue full, channel lost) is read again.
        if (!(err instanceof BurrowError) || !err.retryable || this.closed || this.broken) throw err;
        lastError = err;
      }
      const left = deadline - Date.now();
      if (left <= 0) break;
      await sleep(Math.min(pause, left));
      pause = Math.min(pause * 2, MAX_PAUSE_MS);
    }
    if (seen) {
      throw makeError('DEADLINE_EXCEEDED', `job ${jobId} did not finish in time`, { job_id: jobId });
    }
    if (lastError) throw lastError;
    throw makeError('NOT_FOUND', `job ${jobId} of ${route}: not received by a service, or expired`, {
      job_id: jobId,
      route,
    });
  }

  /**
   * One `result` call (§7.3): the job's record {job_id, state, result?, error?}, or null when the
   * service answers NOT_FOUND (unknown, not received yet, or expired).
   */
  async readJob(jobId, route, timeoutMs) {
    let record;
    try {
      const headers = { 'x-burrow-kind': 'result', 'x-job-id': jobId };
      record = await this.rpc(route, Buffer.from('{}'), headers, { timeoutMs });
    } catch (err) {
      if (err instanceof BurrowError && err.code === 'NOT_FOUND') return null;
      throw err;
    }
    if (record === null || typeof record !== 'object' || !JOB_STATES.has(record.state)) {
      throw makeError('INTERNAL', 'malformed reply to a result call', { reply: record });
    }
    return record;
  }

  /** Drop what this client keeps of a job it submitted; the service keeps its record (§7.2). */
  async forget(jobId) {
    this.dropJob(jobId);
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
    for (const id of [...this.jobs.keys()]) this.dropJob(id);
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
 * jobResultTtlMs (how long the client keeps what it knows of a job it submitted; default 24 h, the
 * service's BURROW_JOB_RESULT_TTL), maxBodyBytes, contractVersion, schemasDir (validate
 * requests/events before publishing).
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
