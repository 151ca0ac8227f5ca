"""Prepares a moto S3 server for tests/s3.rs: an IAM user with S3 rights, a bucket, and the
files of a local directory uploaded under a prefix. Prints "ACCESS_KEY SECRET_KEY".

moto enforces authentication after INITIAL_NO_AUTH_ACTION_COUNT unauthenticated calls, which
is what lets the test check that wrong credentials are refused.
Usage: s3_setup.py ENDPOINT BUCKET PREFIX DIR [EMPTY_KEY...]
Each EMPTY_KEY is put as a zero-byte object: the folder markers ("prefix/") S3 consoles make.
"""
import os
import sys

import boto3

endpoint, bucket, prefix, root = sys.argv[1:5]
empty_keys = sys.argv[5:]
anon = dict(endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="wan")
iam.put_user_policy(
    UserName="wan", PolicyName="s3",
    PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}')
key = iam.create_access_key(UserName="wan")["AccessKey"]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket=bucket)
for dirpath, _, names in os.walk(root):
    for n in names:
        full = os.path.join(dirpath, n)
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        with open(full, "rb") as f:
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=f.read())
for k in empty_keys:
    s3.put_object(Bucket=bucket, Key=k, Body=b"")
print(key["AccessKeyId"], key["SecretAccessKey"])
