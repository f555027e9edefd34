#!/bin/sh
# Create the moderation topics when they do not exist yet; idempotent, never alters a topic that
# exists. Reads the worker's own settings (MODERATION_*: names, partitions, replication factor,
# min.insync.replicas) and the retention settings (TOPIC_*). The verdict cache and hash bank are compacted.
# Partition counts of existing topics are only checked: raising them is an operator's decision
# (it moves keys to other partitions), see deploy/README.md "Scale past the partition count".
set -eu

KAFKA_TOPICS="${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}"
props="${TMPDIR:-/tmp}/client.properties"
protocol="${MODERATION_KAFKA_SECURITY_PROTOCOL:-PLAINTEXT}"

umask 077
echo "security.protocol=${protocol}" > "$props"
case "$protocol" in
  SASL_*)
    mechanism="${MODERATION_KAFKA_SASL_MECHANISM:-PLAIN}"
    case "$mechanism" in
      PLAIN) module=org.apache.kafka.common.security.plain.PlainLoginModule ;;
      *) module=org.apache.kafka.common.security.scram.ScramLoginModule ;;
    esac
    echo "sasl.mechanism=${mechanism}" >> "$props"
    echo "sasl.jaas.config=${module} required username=\"${MODERATION_KAFKA_SASL_USERNAME}\" password=\"${MODERATION_KAFKA_SASL_PASSWORD}\";" >> "$props"
    ;;
esac
if [ -n "${MODERATION_KAFKA_SSL_CAFILE:-}" ]; then
  echo "ssl.truststore.type=PEM" >> "$props"
  echo "ssl.truststore.location=${MODERATION_KAFKA_SSL_CAFILE}" >> "$props"
fi

partitions="${MODERATION_KAFKA_TOPIC_PARTITIONS}"

# create TOPIC [--config KEY=VALUE]...
create() {
  topic="$1"
  shift
  "$KAFKA_TOPICS" --bootstrap-server "$MODERATION_KAFKA_BOOTSTRAP_SERVERS" --command-config "$props" \
    --create --if-not-exists --topic "$topic" --partitions "$partitions" \
    --replication-factor "$MODERATION_KAFKA_REPLICATION_FACTOR" \
    --config "min.insync.replicas=${MODERATION_KAFKA_MIN_INSYNC_REPLICAS}" \
    "$@"
  described="$("$KAFKA_TOPICS" --bootstrap-server "$MODERATION_KAFKA_BOOTSTRAP_SERVERS" --command-config "$props" \
    --describe --topic "$topic")"
  actual="$(printf '%s\n' "$described" | sed -n 's/.*PartitionCount: *\([0-9][0-9]*\).*/\1/p' | head -n 1)"
  if [ "$actual" != "$partitions" ]; then
    echo "WARNING: topic $topic has ${actual:-unknown} partitions, MODERATION_KAFKA_TOPIC_PARTITIONS says $partitions" >&2
  else
    echo "topic $topic: $actual partitions"
  fi
}

create "$MODERATION_TOPIC_UPLOADS" --config "retention.ms=${TOPIC_UPLOADS_RETENTION_MS}"
create "$MODERATION_TOPIC_VERDICTS" --config "retention.ms=${TOPIC_VERDICTS_RETENTION_MS}"
create "$MODERATION_TOPIC_FLAGGED" --config "retention.ms=${TOPIC_FLAGGED_RETENTION_MS}"
create "$MODERATION_TOPIC_DLQ" --config "retention.ms=${TOPIC_DLQ_RETENTION_MS}"
create "$MODERATION_TOPIC_REVIEW" --config "retention.ms=${TOPIC_REVIEW_RETENTION_MS}"
# Who decided what, kept a year: the record reviewers' decisions are audited from.
create "$MODERATION_TOPIC_DECISIONS" --config "retention.ms=${TOPIC_DECISIONS_RETENTION_MS}"
# A table keyed by image sha256 and model weights: the latest entry per key is kept, whatever its age.
create "$MODERATION_TOPIC_CACHE" --config "cleanup.policy=compact"
# Known images by sha256 (reviewers' decisions; by policy the model's flags): the latest entry per key is kept.
create "$MODERATION_TOPIC_BANK" --config "cleanup.policy=compact"
# The explainer's queue and its answers, kept as long as the verdicts they belong to: a request older than
# that explains a verdict its consumers no longer hold.
create "$MODERATION_TOPIC_EXPLAIN_REQUESTS" --config "retention.ms=${TOPIC_EXPLAIN_REQUESTS_RETENTION_MS}"
create "$MODERATION_TOPIC_EXPLANATIONS" --config "retention.ms=${TOPIC_EXPLANATIONS_RETENTION_MS}"
