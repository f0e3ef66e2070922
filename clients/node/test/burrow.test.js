'use strict';
// End-to-end checks of the Node client against a running Burrow serving service.example:calc.
// Needs BURROW_AMQP_URL and BURROW_NAMESPACE (tests/integration/test_node_client.py sets them).

const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const amqp = require('amqplib');
const burrow = require('../burrow.js');

const URL = process.env.BURROW_AMQP_URL;
const NAMESPACE = process.env.BURROW_NAMESPACE;
const skip = !URL || !NAMESPACE ? 'BURROW_AMQP_URL and BURROW_NAMESPACE are not set' : false;
const SCHEMAS = path.join(__dirname, '..', '..', '..', 'schemas');
const WAIT_MS = 15000;

let client;

before(async () => {
  if (!skip) client = await burrow.connect(URL, { namespace: NAMESPACE, defaultTimeoutMs: 10000 });
});

after(async () => {
  if (client) await client.close();
});

// Resolves with the first value `accept` returns for a delivery, or fails after WAIT_MS.
function waiter(accept) {
  let resolve;
  let timer;
  const promise = new Promise((res, rej) => {
    resolve = res;
    timer = setTimeout(() => rej(new Error(`nothing arrived within ${WAIT_MS} ms`)), WAIT_MS);
  }).finally(() => clearTimeout(timer));
  const handler = (payload, meta) => {
    const value = accept(payload, meta);
    if (value !== undefined) resolve(value);
  };
  return { promise, handler };
}

// Whether a queue exists, asked on a connection of its own (a 404 closes the channel; an exclusive
// queue of another connection answers 405 RESOURCE_LOCKED, so it exists).
async function queueExists(name) {
  const connection = await amqp.connect(URL);
  try {
    const ch = await connection.createChannel();
    ch.on('error', () => {});
    try {
      await ch.checkQueue(name);
      return true;
    } catch (err) {
      if (err.code === 404) return false;
      if (err.code === 405) return true;
      throw err;
    }
  } finally {
    await connection.close();
  }
}

test('call calc.add replies with the sum', { skip }, async () => {
  assert.deepEqual(await client.call('calc.add', { a: 1, b: 2 }), { sum: 3 });
});

test('a payload that breaks the schema is a structured INVALID_ARGUMENT from the service', { skip }, async () => {
  const err = await client.call('calc.add', { a: 'x' }).then(
    () => assert.fail('the call should fail'),
    (e) => e,
  );
  assert.ok(err instanceof burrow.errors.InvalidArgument);
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.equal(err.retryable, false);
  assert.equal(err.details.reason, 'schema');
  assert.ok(Array.isArray(err.details.errors));
  assert.deepEqual(err.details.errors.map((e) => e.loc).sort(), ['a', 'b']);
  assert.equal(err.details.errors.find((e) => e.loc === 'b').type, 'missing');
});

test('a handler error comes back with its code and details', { skip }, async () => {
  await assert.rejects(client.call('calc.divide', { a: 1, b: 0 }), (err) => {
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.deepEqual(err.details, { field: 'b' });
    return true;
  });
});

test('an unknown operation of a running service is NOT_FOUND', { skip }, async () => {
  await assert.rejects(client.call('calc.nope', {}), (err) => {
    assert.ok(err instanceof burrow.errors.NotFound);
    assert.equal(err.retryable, false);
    return true;
  });
});

test('a route no queue is bound for is returned and read as NOT_FOUND', { skip }, async () => {
  await assert.rejects(client.call('nosuchservice.op', {}), (err) => {
    assert.equal(err.code, 'NOT_FOUND');
    assert.equal(err.details.route, 'nosuchservice.op');
    return true;
  });
  // The channel survives a return: the next call works.
  assert.deepEqual(await client.call('calc.add', { a: 2, b: 2 }), { sum: 4 });
});

test('a call that outlives its timeout fails with a retryable DEADLINE_EXCEEDED', { skip }, async () => {
  await assert.rejects(client.call('calc.slow_square', { x: 2, delay_ms: 3000 }, { timeoutMs: 300 }), (err) => {
    assert.equal(err.code, 'DEADLINE_EXCEEDED');
    assert.equal(err.retryable, true);
    return true;
  });
});

test('with schemasDir a bad payload is refused before publishing, shaped like the service', { skip }, async () => {
  const checked = await burrow.connect(URL, { namespace: NAMESPACE, schemasDir: SCHEMAS });
  try {
    await assert.rejects(checked.call('calc.add', { a: 'x', c: 1 }), (err) => {
      assert.equal(err.code, 'INVALID_ARGUMENT');
      assert.equal(err.details.reason, 'schema');
      assert.deepEqual(err.details.errors.map((e) => e.loc).sort(), ['a', 'b', 'c']);
      return true;
    });
    assert.deepEqual(await checked.call('calc.add', { a: 5, b: 6 }), { sum: 11 });
  } finally {
    await checked.close();
  }
});

test('submit returns a job id whose completion event and result carry the square', { skip }, async () => {
  let jobId;
  const completion = waiter((payload, meta) => (jobId && meta.jobId === jobId ? { payload, meta } : undefined));
  await client.subscribe('calc.slow_square.completed', completion.handler);
  const trace = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
  jobId = await client.submit('calc.slow_square', { x: 7, delay_ms: 50 }, { traceparent: trace });
  assert.match(jobId, /^[A-Za-z0-9_-]{1,64}$/);
  const { payload, meta } = await completion.promise;
  assert.deepEqual(payload, { square: 49 });
  assert.equal(meta.correlationId, jobId);
  assert.equal(meta.status, 'ok');
  assert.equal(meta.name, 'calc.slow_square.completed');
  assert.equal(meta.traceparent.slice(0, 36), trace.slice(0, 36), 'the completion continues the trace');
  // The result is also in the job queue; reading it without forget leaves it for the next reader.
  assert.deepEqual(await client.result(jobId, { timeoutMs: WAIT_MS }), { square: 49 });
  assert.deepEqual(await client.result(jobId, { timeoutMs: WAIT_MS, forget: true }), { square: 49 });
  assert.equal(await queueExists(`${NAMESPACE}.job.${jobId}`), false);
});

test('a submit to a service nobody runs is NOT_FOUND and leaves no job queue', { skip }, async () => {
  const jobId = 'node-test-unrouted-' + Date.now();
  await assert.rejects(client.submit('nosuchservice.op', {}, { jobId }), (err) => err.code === 'NOT_FOUND');
  assert.equal(await queueExists(`${NAMESPACE}.job.${jobId}`), false);
});

test('a failed job completes with its error', { skip }, async () => {
  const jobId = await client.submit('calc.divide', { a: 1, b: 0 });
  await assert.rejects(client.result(jobId, { timeoutMs: WAIT_MS, forget: true }), (err) => {
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.deepEqual(err.details, { field: 'b' });
    return true;
  });
});

test('an emitted event arrives through the client’s own subscription', { skip }, async () => {
  const x = Math.floor(Math.random() * 1e6) + 1000;
  const got = waiter((payload, meta) => (payload.x === x ? { payload, meta } : undefined));
  const subscription = await client.subscribe('calc.square.*', got.handler);
  assert.equal(await client.emit('calc.square.computed', { x, square: x * x }), true);
  const { payload, meta } = await got.promise;
  assert.deepEqual(payload, { x, square: x * x });
  assert.equal(meta.name, 'calc.square.computed');
  await subscription.cancel();
  assert.equal(await queueExists(subscription.queue), false);
});

test('an event nobody subscribed to is reported as not routed', { skip }, async () => {
  assert.equal(await client.emit('nobody.listens.here', { n: 1 }), false);
});

test('close() leaves no queue of the client behind', { skip }, async () => {
  const own = await burrow.connect(URL, { namespace: NAMESPACE });
  let subscription;
  try {
    subscription = await own.subscribe('#', () => {});
    assert.equal(await queueExists(subscription.queue), true);
    assert.deepEqual(await own.call('calc.add', { a: 0, b: 0 }), { sum: 0 });
  } finally {
    await own.close();
  }
  assert.equal(await queueExists(subscription.queue), false);
  await assert.rejects(own.call('calc.add', { a: 1, b: 1 }), (err) => err.code === 'UNAVAILABLE');
});
