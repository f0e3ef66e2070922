// The broker's own limit: a PerfTest-style loop on the official Java client (Debian's
// librabbitmq-client-java). Same setup as W3: topic exchange, classic durable queue,
// persistent ~100-byte messages, publisher confirms (window 256), manual acks (prefetch 256).
// Prints one line: RESULT {"count":N,"elapsed":s,"events_per_s":x,"publish_per_s":y}

import com.rabbitmq.client.*;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicLong;

public class PerfLoop {
    public static void main(String[] args) throws Exception {
        String uri = args[0];
        String ns = args[1];
        final int total = Integer.parseInt(args[2]);
        final int window = 256;
        String exchange = ns + ".events";
        String queue = ns + ".orders-audit";
        byte[] body = ("{\"seq\":0,\"kind\":\"order.created\",\"order\":\"ord-00000000\","
                + "\"note\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}").getBytes(StandardCharsets.UTF_8);

        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(uri);
        Connection consumerConn = factory.newConnection("bench-limit-consumer");
        Connection producerConn = factory.newConnection("bench-limit-producer");
        Channel setup = consumerConn.createChannel();
        setup.exchangeDeclare(exchange, "topic", true);
        HashMap<String, Object> qargs = new HashMap<>();
        qargs.put("x-queue-type", "classic");
        setup.queueDeclare(queue, true, false, false, qargs);
        setup.queueBind(queue, exchange, "orders.*");

        final CountDownLatch done = new CountDownLatch(1);
        final AtomicLong lastConsumed = new AtomicLong();
        final Channel consumer = consumerConn.createChannel();
        consumer.basicQos(window);
        consumer.basicConsume(queue, false, new DefaultConsumer(consumer) {
            int count = 0;
            @Override
            public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] b)
                    throws java.io.IOException {
                consumer.basicAck(env.getDeliveryTag(), false);
                if (++count == total) {
                    lastConsumed.set(System.nanoTime());
                    done.countDown();
                }
            }
        });

        Channel producer = producerConn.createChannel();
        producer.confirmSelect();
        final Semaphore outstanding = new Semaphore(window);
        final ConcurrentSkipListSet<Long> unconfirmed = new ConcurrentSkipListSet<>();
        ConfirmListener listener = new ConfirmListener() {
            void settle(long tag, boolean multiple) {
                if (multiple) {
                    java.util.NavigableSet<Long> head = unconfirmed.headSet(tag, true);
                    int n = head.size();
                    head.clear();
                    outstanding.release(n);
                } else if (unconfirmed.remove(tag)) {
                    outstanding.release();
                }
            }
            public void handleAck(long tag, boolean multiple) { settle(tag, multiple); }
            public void handleNack(long tag, boolean multiple) { settle(tag, multiple); }
        };
        producer.addConfirmListener(listener);
        AMQP.BasicProperties props = MessageProperties.PERSISTENT_BASIC.builder()
                .contentType("application/json").build();

        long started = System.nanoTime();
        for (int i = 0; i < total; i++) {
            outstanding.acquire();
            unconfirmed.add(producer.getNextPublishSeqNo());
            producer.basicPublish(exchange, "orders.created", true, props, body);
        }
        outstanding.acquire(window);
        long published = System.nanoTime();
        if (!done.await(300, TimeUnit.SECONDS)) {
            throw new IllegalStateException("not every message was consumed");
        }
        double e2e = (lastConsumed.get() - started) / 1e9;
        double pub = (published - started) / 1e9;
        setup.queueDelete(queue);
        setup.exchangeDelete(exchange);
        producerConn.close();
        consumerConn.close();
        System.out.printf(java.util.Locale.ROOT,
            "RESULT {\"count\":%d,\"elapsed\":%.4f,\"events_per_s\":%.1f,\"publish_per_s\":%.1f}%n",
            total, e2e, total / e2e, total / pub);
    }
}
