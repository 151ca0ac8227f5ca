#!/bin/bash
# A throwaway single-host Ceph for tests/s3.rs: one monitor, one OSD keeping its data in memory
# (memstore: no disk), and one radosgw (the S3 gateway), all from Debian's ceph packages, with
# cephx authentication off inside the cluster (the S3 API still checks SigV4 signatures).
# Every daemon writes its pid to DIR/run/*.pid; the caller kills them by those pids.
# Usage: ceph_rgw.sh DIR MON_PORT RGW_PORT ACCESS_KEY SECRET_KEY
# MEMSTORE_BYTES: the OSD's memory (default 1 GiB; benches/s3.sh stores a 1 GiB object).
# Prints the S3 endpoint once radosgw answers.
set -euo pipefail
D=$1 MON_PORT=$2 RGW_PORT=$3 AK=$4 SK=$5
trap 'echo "ceph_rgw.sh: line $LINENO failed: $BASH_COMMAND" >&2; tail -n 5 "$D"/log/*.log >&2' ERR
mkdir -p "$D"/{mon,osd,run,log}
FSID=$(cat /proc/sys/kernel/random/uuid)
cat > "$D/ceph.conf" <<CONF
[global]
fsid = $FSID
# msgr v1 only: on a port other than 3300, v2 would be assumed and the auth-less handshake fails.
mon host = [v1:127.0.0.1:$MON_PORT]
# Fail in seconds, not the default 5 minutes, if the monitor cannot be reached.
client mount timeout = 30
mon initial members = a
# The monitor refuses to start below 5% free on its data disk; this cluster keeps next to nothing
# there (the data is in memory), and a shared build machine's disk is often that full.
mon data avail crit = 1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
# One OSD: one copy of everything, and no warnings about it.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
# The OSD's own crush update at start can race the monitor's first map (seen: "wrong fsid", and
# the OSD exits); the script places it in the crush map itself.
osd class update on start = false
osd crush update on start = false
memstore device bytes = ${MEMSTORE_BYTES:-1073741824}
run dir = $D/run
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
[mon.a]
mon data = $D/mon
[osd.0]
osd data = $D/osd
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
CONF
C=(-c "$D/ceph.conf")
monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon "${C[@]}" --mkfs -i a --monmap "$D/monmap"
ceph-mon "${C[@]}" -i a
# The monitor answers before it is ready for commands (seen: "EPERM: problem getting command
# descriptions", its log saying "fsid 0000… != …"): ask again until it takes one.
for _ in $(seq 100); do
  ceph "${C[@]}" osd create >/dev/null 2>&1 && break
  sleep 0.2
done
ceph "${C[@]}" osd stat >/dev/null
ceph-osd "${C[@]}" -i 0 --mkfs 2>/dev/null
ceph "${C[@]}" osd crush add osd.0 1.0 host=localhost root=default >/dev/null 2>&1
ceph-osd "${C[@]}" -i 0 2>/dev/null
for _ in $(seq 300); do
  ceph "${C[@]}" osd stat 2>/dev/null | grep -q ' 1 up' && break
  sleep 0.1
done
ceph "${C[@]}" osd stat | grep -q ' 1 up'
radosgw "${C[@]}" -n client.rgw
radosgw-admin "${C[@]}" user create --uid wan --display-name wan \
  --access-key "$AK" --secret "$SK" >/dev/null
for _ in $(seq 600); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT") 2>/dev/null; then
    echo "http://127.0.0.1:$RGW_PORT"
    exit 0
  fi
  sleep 0.1
done
echo "radosgw did not listen on $RGW_PORT within 60 s; see $D/log" >&2
exit 1
