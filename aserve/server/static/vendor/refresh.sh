#!/usr/bin/env bash
# Refreshes the vendored browser libraries of the chat page from the npm registry, at the pinned
# versions below (edit them to upgrade), with their licences. The page loads only these copies:
# nothing is fetched from a CDN at run time, and there is no build step.
#   aserve/server/static/vendor/refresh.sh
set -euo pipefail
MARKED=18.3.0      # Markdown to HTML (MIT)
DOMPURIFY=3.5.0    # HTML sanitizer (Apache-2.0 or MPL-2.0)
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent "marked@$MARKED" "dompurify@$DOMPURIFY" >/dev/null  # npm checks each tarball's integrity
mkdir marked dompurify
tar xzf "marked-$MARKED.tgz" -C marked
tar xzf "dompurify-$DOMPURIFY.tgz" -C dompurify
cp marked/package/lib/marked.umd.js "$here/marked.umd.js"
cp marked/package/LICENSE "$here/marked.LICENSE"
cp dompurify/package/dist/purify.min.js "$here/purify.min.js"
cp dompurify/package/LICENSE "$here/dompurify.LICENSE"
printf 'marked %s\ndompurify %s\n' "$MARKED" "$DOMPURIFY" > "$here/VERSIONS"
echo "vendored marked $MARKED and dompurify $DOMPURIFY into $here"
