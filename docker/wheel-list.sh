# shellcheck shell=bash
# The off-index wheel list (requirements/wheels-*.txt), read the same way by download-packages.sh and
# docker/install.sh. One "URL SHA256" per line; '#' starts a comment. Sourced, not run.

# wheel_list FILE: print "URL SHA256 FILENAME" per entry; FILENAME is the URL's last path segment, percent-decoded
# (release URLs spell the '+' of a local version as %2B, pip wants the real name). Malformed lines are an error.
wheel_list() {
  local line url sha rest name
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    read -r url sha rest <<<"$line" || true
    [ -z "${url:-}" ] && continue
    if [ -n "${rest:-}" ] || ! [[ ${sha:-} =~ ^[0-9a-f]{64}$ ]]; then
      echo "$1: expected 'URL SHA256', got: $line" >&2
      return 1
    fi
    name=${url%%[?#]*}
    name=${name##*/}
    printf '%s %s %b\n' "$url" "$sha" "${name//%/\\x}"
  done <"$1"
}
