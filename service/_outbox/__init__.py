"""The transactional outbox and inbox on PostgreSQL: messages written in the user's own
transaction, published by a relay; deliveries handled once per message id."""
