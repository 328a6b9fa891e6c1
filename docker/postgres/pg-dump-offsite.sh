#!/bin/sh
# Daily logical backup off-site: pg_dump -Fc of $PGDATABASE (checked with pg_restore --list) uploaded to
# $DUMP_DESTINATION/<database>-<UTC time>.dump (s3://bucket/prefix), then dumps older than
# $DUMP_RETENTION_DAYS (default 30) are deleted. Connection: libpq variables (PGHOST, PGUSER,
# PGPASSWORD, PGDATABASE); bucket: AWS_* variables (+ BACKUP_ENDPOINT_URL for S3-compatible stores).
# Exit non-zero on any failure (the CronJob's failed Job is the alert).
set -eu
: "${DUMP_DESTINATION:?s3://bucket/prefix}" "${PGDATABASE:?}"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
key="${PGDATABASE}-${stamp}.dump"
file="${TMPDIR:-/tmp}/${key}"
trap 'rm -f "$file"' EXIT
# to a file first: a failed pg_dump must never become an uploaded (truncated) dump
pg_dump -Fc --no-owner --no-privileges -f "$file"
pg_restore --list "$file" > /dev/null
python3 - "$DUMP_DESTINATION" "$key" "${DUMP_RETENTION_DAYS:-30}" "$file" <<'PY'
import datetime, os, sys
import boto3
destination, key, keep_days, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
bucket, _, prefix = destination.removeprefix("s3://").partition("/")
prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
s3 = boto3.client("s3", endpoint_url=os.environ.get("BACKUP_ENDPOINT_URL") or None)
s3.upload_file(path, bucket, prefix + key)
size = s3.head_object(Bucket=bucket, Key=prefix + key)["ContentLength"]
if size == 0:
    sys.exit("empty dump uploaded")
cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=keep_days)
old = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
       for o in page.get("Contents", []) if o["Key"].endswith(".dump") and o["LastModified"] < cutoff]
for k in old:
    s3.delete_object(Bucket=bucket, Key=k)
print(f'{{"dump": "s3://{bucket}/{prefix}{key}", "bytes": {size}, "deleted_old": {len(old)}}}')
PY
