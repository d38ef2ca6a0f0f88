#!/usr/bin/env bash
# Installs the Debian packages megacredit's tests and sandbox use, best effort, in ONE apt-get call.
# Called by `make system-deps`. Each entry: a check that passes when the piece is present, the
# packages that provide it, and what is lost without it. Missing pieces are installed when we are
# root with apt-get; otherwise (or when apt fails) a warning says what will be skipped or weaker.
set -u

python=${PYTHON:-python3}
# check | packages | what is lost without it
entries=(
  "command -v bwrap|bubblewrap|the code sandbox uses its weaker fallback (megacredit/envs/sandbox.py)"
  "$python -c \"import ctypes; ctypes.CDLL('libseccomp.so.2')\"|libseccomp2|the code sandbox runs without its syscall filter"
  "command -v chromium|chromium|the token-heatmap screenshot test is skipped"
  "command -v slurmctld && command -v slurmd && command -v sbatch && command -v slurmdbd && command -v mariadbd|slurmctld slurmd slurm-client slurmdbd mariadb-server|the Slurm launcher tests are skipped (tests/integration/slurm_cluster.py)"
)

missing_packages=()
missing_notes=()
for entry in "${entries[@]}"; do
  IFS='|' read -r check packages note <<<"$entry"
  if ! eval "$check" >/dev/null 2>&1; then
    read -r -a pkgs <<<"$packages"
    missing_packages+=("${pkgs[@]}")
    missing_notes+=("$packages: without it $note")
  fi
done
[ ${#missing_packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing_packages[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing_packages[@]}"; then
    exit 0
  fi
  echo "warning: apt-get could not install ${missing_packages[*]}"
fi
for note in "${missing_notes[@]}"; do echo "warning: missing $note"; done
exit 0
