"""Creates BUCKET on an S3 server and uploads the files of DIR under PREFIX, for tests/s3.rs
(servers whose user already exists, such as Ceph's radosgw; moto uses s3_setup.py).
Usage: s3_put.py ENDPOINT ACCESS_KEY SECRET_KEY BUCKET PREFIX DIR
"""
import os
import sys

import boto3

endpoint, ak, sk, bucket, prefix, root = sys.argv[1:7]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id=ak, aws_secret_access_key=sk)
s3.create_bucket(Bucket=bucket)
for dirpath, _, names in os.walk(root):
    for n in names:
        full = os.path.join(dirpath, n)
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        s3.upload_file(full, bucket, f"{prefix}/{rel}")
