"""What every deployable uses to reach Kafka and S3, beside the contracts: connection options, a reader of
topics without a consumer group, the record as a broker gives it, the publisher, the dead-letter headers and
the allowlisted, byte-capped S3 GET. Nothing here imports Faust."""
