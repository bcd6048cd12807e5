# deploy/check.mk: `make check-deploy` checks deploy/ with the real tools. Included by the top-level
# Makefile (which defines venv, PY and VENV). Tools:
#   promtool, prometheus  apt-get install -y prometheus
#   kubectl (kustomize)   in the CI image (google-cloud-cli's kubectl, kustomize v5)
#   hadolint, kubernetes-validate, check-jsonschema   PyPI, the `test` extra
# With CI=true a missing tool fails the pytest checks instead of skipping them.
PROMTOOL ?= promtool
KUBECTL ?= kubectl

.PHONY: check-deploy
check-deploy: venv
	$(PROMTOOL) check config deploy/prometheus/prometheus.yml
	$(PROMTOOL) check rules deploy/prometheus/rules/*.yml
	$(PROMTOOL) test rules deploy/prometheus/tests/*.yml
	$(PY) deploy/prometheus/render_prometheusrule.py --check
	$(VENV)/bin/hadolint deploy/Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec \
		deploy/compose/compose.yaml deploy/compose/compose.gpu.yaml
	for o in base overlays/gpu overlays/gpu-object-store; do \
		$(KUBECTL) kustomize deploy/k8s/$$o > /dev/null || exit 1; done
	$(PY) -m pytest -q -ra tests/deploy
