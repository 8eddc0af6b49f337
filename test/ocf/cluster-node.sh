#!/bin/sh
# One node of the test cluster (test/ocf/cluster.test.ts): run as
#   ip netns exec NS unshare -m --propagation private cluster-node.sh NAME DIR OCF_DIR
# In its own mount namespace the node gets its own /etc/corosync, /var/lib/pacemaker, /run,
# /dev/shm and /var/log/pacemaker (directories under DIR/NAME), the repository's agent as
# provider "lockstep", and DIR/corosync.conf; then corosync and pacemakerd run in the
# foreground. Killing every process of the network namespace is the node's power loss.
set -e
NAME=$1
DIR=$2
OCF_DIR=$3
R="${DIR}/${NAME}"
mkdir -p "${R}/etc-corosync" "${R}/pacemaker" "${R}/run" "${R}/shm" "${R}/log"
# pacemaker's daemons run as hacluster and make their IPC files in /dev/shm and /run
chmod 1777 "${R}/shm" "${R}/run"
mount --bind "${R}/etc-corosync" /etc/corosync
mount --bind "${R}/pacemaker" /var/lib/pacemaker
mount --bind "${R}/run" /run
mount --bind "${R}/shm" /dev/shm
mkdir -p /var/log/pacemaker
mount --bind "${R}/log" /var/log/pacemaker
mount --bind "${OCF_DIR}" /usr/lib/ocf/resource.d/lockstep
mkdir -p /var/lib/pacemaker/cib /var/lib/pacemaker/pengine /var/lib/pacemaker/blackbox /var/lib/pacemaker/cores
chown -R hacluster:haclient /var/lib/pacemaker /var/log/pacemaker
cp "${DIR}/corosync.conf" /etc/corosync/corosync.conf
corosync -f > "${R}/corosync.out" 2>&1 &
echo $! > "${R}/corosync.pid"
# pacemakerd waits for corosync itself (it retries the connection)
PCMK_logfile=/var/log/pacemaker/pacemaker.log pacemakerd -f > "${R}/pacemakerd.out" 2>&1 &
echo $! > "${R}/pacemakerd.pid"
wait
