#!/usr/bin/env bash
# Render each kustomization (kubectl's built-in kustomize), validate every object against the
# official Kubernetes schemas (strict: unknown fields fail), check what an API server or a
# kubelet would refuse across fields (k8s/api_checks.py), and lint the YAML.
# Usage: k8s/validate.sh [kustomization folder ...]
#        (default: base, every overlay, and the training kustomizations)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-1.37.0}"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(k8s/base k8s/overlays/*/ k8s/training k8s/training-backbone k8s/training/multiworker k8s/batch-predict)
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT

yamllint --strict -c .yamllint.yaml k8s/ bentofile.yaml
for target in "${targets[@]}"; do
    name="$(echo "${target%/}" | tr '/' '_')"
    kubectl kustomize "$target" > "$rendered/$name.yaml"
    objects=$(grep -c '^kind:' "$rendered/$name.yaml")
    # CRDs (ServiceMonitor, PrometheusRule) have no official schema: they only warn here;
    # their content is checked by promtool and the tests.
    kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$rendered/$name.yaml"
    python k8s/api_checks.py "$rendered/$name.yaml"
    echo "ok: ${target%/} ($objects objects, Kubernetes $KUBERNETES_VERSION schemas, strict; api checks)"
done
# Manifests applied on their own (kubectl create -f), outside any kustomization.
for manifest in k8s/batch-predict/merge-job.yaml; do
    kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "$manifest"
    python k8s/api_checks.py "$manifest"
    echo "ok: $manifest (Kubernetes $KUBERNETES_VERSION schemas, strict; api checks)"
done
