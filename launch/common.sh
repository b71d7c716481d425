# Shared by the launch scripts (sourced, not run): argument parsing, --dry-run and command echoing.
# Every command a script runs goes through `run`, so `--dry-run` prints exactly what a real run executes.
# Kept to bash 3.2 features: tpu_vm.sh runs on laptops, and macOS ships bash 3.2.

DRY_RUN=0
MAIN_ARGS=()
# dunet_jax.main's exit status after a preemption notice (SIGTERM): it saved a checkpoint at the step
# all processes agreed on, and rerunning the same command resumes from it (dunet_jax.preemption.EXIT_CODE).
PREEMPTED_EXIT_CODE=75

die() {
  echo "error: $*" >&2
  exit 1
}

warn() {
  echo "warning: $*" >&2
}

# Shell-quotes one word only when it needs it, so the printed lines stay readable and copy-pastable.
quote_word() {
  local word=$1
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$word"
  else
    local escaped=${word//\'/\'\\\'\'}
    printf "'%s'" "$escaped"
  fi
}

quote_words() {
  local first=1 word
  for word in "$@"; do
    if [ "$first" = 1 ]; then first=0; else printf ' '; fi
    quote_word "$word"
  done
}

# Prints '+ COMMAND' and runs it unless --dry-run.
run() {
  echo "+ $(quote_words "$@")"
  if [ "$DRY_RUN" = 0 ]; then
    "$@"
  fi
}

# Prints '+ export NAME=VALUE' and exports it (harmless in --dry-run: nothing else runs).
run_export() {
  echo "+ export $1=$(quote_word "$2")"
  export "$1=$2"
}

# --dry-run, --config=..., --workdir=..., --help; every other argument goes to dunet_jax.main as is
# (e.g. --config.train.batch_size=32).
parse_args() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --config=*) CONFIG=${arg#--config=} ;;
      --workdir=*) WORKDIR=${arg#--workdir=} ;;
      -h|--help) usage; exit 0 ;;
      *) MAIN_ARGS+=("$arg") ;;
    esac
  done
}

# Fails with one clear message when a tool is missing (skipped for --dry-run, which runs nothing).
require_command() {
  local name=$1 hint=$2
  if [ "$DRY_RUN" = 0 ] && ! command -v "$name" >/dev/null 2>&1; then
    die "'$name' not found on PATH: $hint (or pass --dry-run to only print the commands)"
  fi
}

# The config file must exist in the checkout; 'configs/voc.py:r101_os8' names a preset of configs/voc.py.
check_config_file() {
  local repo_root=$1 config_file=${CONFIG%%:*}
  if [ ! -f "$repo_root/$config_file" ]; then
    local message="config file '$config_file' (CONFIG=$CONFIG) not found under $repo_root: set CONFIG or --config= to a file in configs/"
    if [ "$DRY_RUN" = 1 ]; then warn "$message"; else die "$message"; fi
  fi
}

# The dunet_jax.main command line, shell-quoted.
main_command() {
  local python=$1
  quote_words "$python" -m dunet_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" ${MAIN_ARGS[@]+"${MAIN_ARGS[@]}"}
}
