-- A dead letter is recorded once per message item: a batch that is replayed after its commit
-- (a lost ack, a crash before the ack) must not record its dead letters again. message_id is
-- `<AMQP message_id>#<index>` for an item of a batch envelope, the AMQP message_id otherwise;
-- a foreign message without one (NULL) cannot be told apart from its redelivery and may repeat.
DELETE FROM dead_letters AS later
USING dead_letters AS earlier
WHERE later.message_id = earlier.message_id AND later.id > earlier.id;

CREATE UNIQUE INDEX dead_letters_message_id ON dead_letters (message_id);
