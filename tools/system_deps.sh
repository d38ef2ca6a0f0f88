#!/usr/bin/env bash
# Installs the Debian packages megacredit's tests and sandbox use, in ONE apt-get call.
# Called by `make system-deps`. Each entry: a check that passes when the piece is present, the
# packages that provide it, and what is lost without it. Missing pieces are installed when we are
# root with apt-get. When one cannot be installed (apt failed, not root, no apt-get) the script
# names it and exits 1, so `make test` stops instead of going green by skipping its tests.
# Escape hatch for a developer without root: SYSTEM_DEPS=optional (`make test SYSTEM_DEPS=optional`)
# turns that into warnings and exit 0; the tests needing the missing pieces then skip (and still
# fail under .ci/run, which sets MEGACREDIT_REQUIRE_ALL=1; tests/make_deps.py).
set -u

python=${PYTHON:-python3}
mode=${SYSTEM_DEPS:-required}
# check | packages | what is lost without it
entries=(
  "command -v bwrap|bubblewrap|the code sandbox uses its weaker fallback (megacredit/envs/sandbox.py)"
  "$python -c \"import ctypes; ctypes.CDLL('libseccomp.so.2')\"|libseccomp2|the code sandbox runs without its syscall filter"
  "command -v chromium|chromium|the token-heatmap screenshot test is skipped"
  "command -v slurmctld && command -v slurmd && command -v sbatch && command -v slurmdbd && command -v mariadbd|slurmctld slurmd slurm-client slurmdbd mariadb-server|the Slurm launcher tests are skipped (tests/integration/slurm_cluster.py)"
  "command -v ip && command -v nsenter && command -v unshare|iproute2 util-linux|the two-node Slurm tests are skipped (tests/integration/slurm_netns.py)"
)

missing_packages=()
missing_notes=()
find_missing() {
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
}

find_missing
[ ${#missing_packages[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing_packages[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing_packages[@]}"; then
    find_missing  # installed, but does each check pass now?
    [ ${#missing_packages[@]} -eq 0 ] && exit 0
  fi
  echo "system-deps: apt-get could not provide ${missing_packages[*]}"
else
  echo "system-deps: cannot install ${missing_packages[*]} (needs root and apt-get)"
fi
if [ "$mode" = optional ]; then
  for note in "${missing_notes[@]}"; do echo "warning: missing $note"; done
  exit 0
fi
for note in "${missing_notes[@]}"; do echo "error: missing $note" >&2; done
echo "error: install them as root (make system-deps), or continue without them: make test SYSTEM_DEPS=optional" >&2
exit 1
