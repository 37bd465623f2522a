{{/* Names: <release>-samserve[-part], cut to 63 characters. */}}
{{- define "samserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "samserve.name" -}}
{{- printf "%s-%s" (include "samserve.fullname" .root) .part | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "samserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component (triton, gateway, redis, locust-master, locust-worker, prepare). */}}
{{- define "samserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag of images.<name>; .tag is the default tag when the value is empty. */}}
{{- define "samserve.image" -}}
{{- $image := index .root.Values.images .name -}}
{{- printf "%s:%s" $image.repository (default .tag $image.tag) -}}
{{- end -}}

{{/* Triton's default tag per target: the CPU image, NVIDIA's release, or that plus PyTorch (SAMSERVE_EXTRAS=gpu). */}}
{{- define "samserve.tritonImage" -}}
{{- $tags := dict "gpu-tensorrt" (printf "%s-%s" .Chart.AppVersion .Values.tritonRelease) "gpu-torch" (printf "%s-%s-torch" .Chart.AppVersion .Values.tritonRelease) -}}
{{- $tag := get $tags .Values.servingTarget | default (printf "%s-cpu" .Chart.AppVersion) -}}
{{- include "samserve.image" (dict "root" . "name" "triton" "tag" $tag) -}}
{{- end -}}

{{/* Combinations that cannot work fail here, before anything renders (values.schema.json types each value). */}}
{{- define "samserve.validate" -}}
{{- $v := .Values -}}
{{- $gpus := int $v.triton.gpu.count -}}
{{- if and (hasPrefix "gpu-" $v.servingTarget) (eq $gpus 0) }}
{{- fail (printf "servingTarget=%s runs on GPUs: set triton.gpu.count >= 1 (and the GPU nodes' nodeSelector/tolerations), or a cpu-* target" $v.servingTarget) }}
{{- end }}
{{- if and (hasPrefix "cpu-" $v.servingTarget) (gt $gpus 0) }}
{{- fail (printf "servingTarget=%s runs on CPUs: set triton.gpu.count=0, or a gpu-* target (gpu-torch, gpu-tensorrt)" $v.servingTarget) }}
{{- end }}
{{- if include "samserve.claimOnOneNode" . }}
{{- $several := or (gt (int $v.triton.replicas) 1) (ne $v.autoscaling.mode "none") -}}
{{- if and $several $v.triton.topologySpread.enabled }}
{{- fail "a ReadWriteOnce model claim attaches to one node, so every Triton pod runs there: use modelRepository.pvc.accessModes [ReadWriteMany] (or source=url) to spread Triton pods over nodes, or set triton.topologySpread.enabled=false to keep them on one node" }}
{{- end }}
{{- end }}
{{- if and (eq $v.modelRepository.source "pvc") (has "ReadWriteOncePod" $v.modelRepository.pvc.accessModes) }}
{{- fail "modelRepository.pvc.accessModes ReadWriteOncePod: Triton pods and the prepare step share the claim; use ReadWriteOnce or ReadWriteMany" }}
{{- end }}
{{- if or (eq $v.servingTarget "gpu-tensorrt") $v.tensorrtEngines.enabled }}
{{- $version := include "samserve.tensorrtVersion" . -}}
{{- if ne (first (splitList "." $version)) (toString $v.tensorrtEngines.tensorrtMajor) }}
{{- fail (printf "tensorrtEngines.tensorrtMajor=%v but tritonRelease %s ships TensorRT %s" $v.tensorrtEngines.tensorrtMajor $v.tritonRelease $version) }}
{{- end }}
{{- if and (eq $v.servingTarget "gpu-tensorrt") (eq $v.modelRepository.source "emptyDir") }}
{{- fail "servingTarget=gpu-tensorrt needs modelRepository.source pvc (the engine Job records plans there) or url" }}
{{- end }}
{{- end }}
{{- end -}}

{{/* TensorRT's version in tritonRelease's containers (tensorrtEngines.tensorrtVersions). */}}
{{- define "samserve.tensorrtVersion" -}}
{{- $versions := .Values.tensorrtEngines.tensorrtVersions -}}
{{- if not (hasKey $versions .Values.tritonRelease) }}
{{- fail (printf "tensorrtEngines.tensorrtVersions has no entry for tritonRelease %q: add TensorRT's version in NVIDIA's %s containers (their release notes; trtexec prints it) so that Triton waits for engines of that version" .Values.tritonRelease .Values.tritonRelease) }}
{{- end }}
{{- index $versions .Values.tritonRelease -}}
{{- end -}}

{{/* The model claim (source=pvc): the chart's, or modelRepository.pvc.existingClaim. */}}
{{- define "samserve.modelsClaim" -}}
{{- default (include "samserve.name" (dict "root" . "part" "models")) .Values.modelRepository.pvc.existingClaim -}}
{{- end -}}

{{/* "true" when the model claim attaches to one node at a time (neither ReadWriteMany nor ReadOnlyMany). */}}
{{- define "samserve.claimOnOneNode" -}}
{{- $r := .Values.modelRepository -}}
{{- if and (eq $r.source "pvc") (not (or (has "ReadWriteMany" $r.pvc.accessModes) (has "ReadOnlyMany" $r.pvc.accessModes))) -}}true{{- end -}}
{{- end -}}

{{/* Label of every pod that mounts the model claim. */}}
{{- define "samserve.claimLabel" -}}
samserve.dev/models-claim: {{ include "samserve.modelsClaim" . }}
{{- end -}}

{{/* Affinity of a pod that mounts the model claim: with claimOnOneNode, onto the node of the claim's other pods (the
first one, matching its own term, goes anywhere). .affinity: the pod's own affinity values. */}}
{{- define "samserve.claimAffinity" -}}
{{- $affinity := deepCopy (.affinity | default dict) -}}
{{- if include "samserve.claimOnOneNode" .root }}
{{- if hasKey $affinity "podAffinity" }}
{{- fail "podAffinity of a pod mounting a ReadWriteOnce model claim is the chart's (onto the claim's node): drop it, or use a ReadWriteMany claim" }}
{{- end }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "samserve.claimLabel" .root | fromYaml)) -}}
{{- $_ := set $affinity "podAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) -}}
{{- end }}
{{- with $affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* serviceAccountName of the pods that read or write the models ("" = the namespace's default). */}}
{{- define "samserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "samserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A Job's name: <release>-samserve-<part>-<hash of its pod template>. A Job's template is immutable: a changed
template is a new Job (the old one is pruned), an unchanged one keeps its name, so upgrades and GitOps syncs apply. */}}
{{- define "samserve.jobName" -}}
{{- printf "%s-%s" (include "samserve.name" (dict "root" .root "part" .part) | trunc 52 | trimSuffix "-") (.template | sha256sum | trunc 10) -}}
{{- end -}}

{{/* The pods (gateway or Triton) that serve the gateway API: their selector labels. */}}
{{- define "samserve.gatewayComponent" -}}
{{- ternary "triton" "gateway" (eq .Values.gateway.mode "sidecar") -}}
{{- end -}}

{{- define "samserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "samserve.redisSecret" -}}
{{- .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* "true" when the gateways send a Redis password: from redis.auth.existingSecret (required in standalone mode). */}}
{{- define "samserve.redisPassword" -}}
{{- if and (ne .Values.redis.mode "none") .Values.redis.auth.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The Redis URL the gateways use ("" = no tier 2). */}}
{{- define "samserve.redisUrl" -}}
{{- if eq .Values.redis.mode "standalone" -}}
{{- printf "%s://%s:6379/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "samserve.name" (dict "root" . "part" "redis")) -}}
{{- else if has .Values.redis.mode (list "external" "cluster") -}}
{{- required "redis.url is required for redis.mode external and cluster" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The gateway container. .transport: shm (sidecar) or grpc (own Deployment); .tritonHost; .models: the pod has
the model volume (the sidecar beside a pvc or emptyDir repository), whose decoder the gateway hands to browsers. */}}
{{- define "samserve.gatewayContainer" -}}
{{- $v := .root.Values -}}
{{- $g := $v.gateway -}}
{{- $probePort := ternary "health" "grpc" $g.tls.enabled -}}
- name: gateway
  image: {{ include "samserve.image" (dict "root" .root "name" "gateway" "tag" .root.Chart.AppVersion) }}
  imagePullPolicy: {{ $v.images.gateway.pullPolicy }}
  ports:
    - {name: grpc, containerPort: {{ $g.ports.grpc }}, protocol: TCP}
    - {name: http, containerPort: {{ $g.ports.http }}, protocol: TCP}
    - {name: metrics, containerPort: {{ $g.ports.metrics }}, protocol: TCP}
    {{- if $g.tls.enabled }}
    - {name: health, containerPort: {{ $g.ports.health }}, protocol: TCP}
    {{- end }}
  env:
    - {name: SAMSERVE_GATEWAY_HOST, value: "0.0.0.0"}
    - {name: SAMSERVE_GATEWAY_PORT, value: {{ $g.ports.grpc | quote }}}
    - {name: SAMSERVE_HTTP_PORT, value: {{ $g.ports.http | quote }}}
    - {name: SAMSERVE_METRICS_PORT, value: {{ $g.ports.metrics | quote }}}
    - {name: SAMSERVE_TRITON_HOST, value: {{ .tritonHost | quote }}}
    - {name: SAMSERVE_TRITON_GRPC_PORT, value: {{ $v.triton.ports.grpc | quote }}}
    - {name: SAMSERVE_EMBEDDING_TRANSPORT, value: {{ .transport }}}
    - {name: SAMSERVE_SHUTDOWN_GRACE_S, value: {{ $g.shutdownGraceSeconds | quote }}}
    - {name: SAMSERVE_MAX_CONNECTION_AGE_S, value: {{ $g.maxConnectionAgeSeconds | quote }}}
    - {name: SAMSERVE_MAX_CONNECTION_AGE_GRACE_S, value: {{ $g.maxConnectionAgeGraceSeconds | quote }}}
    - {name: SAMSERVE_MAX_REQUEST_BYTES, value: {{ $g.maxRequestBytes | int64 | quote }}}
    - {name: SAMSERVE_LOG_LEVEL, value: {{ $g.logLevel }}}
    - {name: SAMSERVE_L1_CACHE_BYTES, value: {{ $g.l1CacheBytes | int64 | quote }}}
    - {name: SAMSERVE_L1_IMAGE_BYTES, value: {{ $g.l1ImageBytes | int64 | quote }}}
    - {name: SAMSERVE_AUTH, value: {{ $g.auth.mode }}}
    {{- if and (eq $g.auth.mode "api-keys") $g.auth.apiKeysSecret }}
    - {name: SAMSERVE_API_KEYS_FILE, value: /etc/samserve/keys/keys.json}
    {{- end }}
    {{- if and (eq $g.auth.mode "api-keys") $g.auth.jwksSecret }}
    - {name: SAMSERVE_JWT_JWKS_FILE, value: /etc/samserve/jwks/jwks.json}
    {{- end }}
    {{- if $g.tls.enabled }}
    - {name: SAMSERVE_TLS_CERT_FILE, value: /etc/samserve/tls/tls.crt}
    - {name: SAMSERVE_TLS_KEY_FILE, value: /etc/samserve/tls/tls.key}
    - {name: SAMSERVE_HEALTH_PORT, value: {{ $g.ports.health | quote }}}
    {{- if $g.tls.clientAuth }}
    - {name: SAMSERVE_TLS_CLIENT_CA_FILE, value: /etc/samserve/tls/ca.crt}
    {{- end }}
    {{- end }}
    {{- $redisUrl := include "samserve.redisUrl" .root }}
    {{- if $redisUrl }}
    - {name: SAMSERVE_REDIS_URL, value: {{ $redisUrl | quote }}}
    - {name: SAMSERVE_REDIS_CLUSTER, value: {{ eq $v.redis.mode "cluster" | quote }}}
    {{- if include "samserve.redisPassword" .root }}
    - {name: SAMSERVE_REDIS_PASSWORD_FILE, value: /etc/samserve/redis/password}
    {{- end }}
    - {name: SAMSERVE_REDIS_TTL_S, value: {{ $v.redis.ttlSeconds | quote }}}
    {{- if $v.redis.tls.enabled }}
    - {name: SAMSERVE_REDIS_TLS_CA_FILE, value: /etc/samserve/redis-tls/ca.crt}
    {{- end }}
    {{- end }}
    {{- if .models }}
    # The served decoder for the web page's client-side decoding (what `samserve up` offers).
    - {name: SAMSERVE_CLIENT_DECODER_DIR, value: /models/repository/sam_decoder/1}
    {{- end }}
    {{- range $name, $value := $g.extraSettings }}
    - {name: {{ printf "SAMSERVE_%s" (upper $name) }}, value: {{ $value | quote }}}
    {{- end }}
  # Liveness: the process listens (a Triton outage must not restart gateways); readiness: grpc.health.v1 for the
  # API service, SERVING only while Triton's models are ready.
  startupProbe:
    tcpSocket: {port: {{ $probePort }}}
    periodSeconds: 2
    failureThreshold: 60
  readinessProbe:
    grpc: {port: {{ ternary $g.ports.health $g.ports.grpc $g.tls.enabled }}, service: samserve.v1.SegmentAnything}
    periodSeconds: 5
    failureThreshold: 2
  livenessProbe:
    tcpSocket: {port: {{ $probePort }}}
    periodSeconds: 10
    failureThreshold: 6
  {{- if gt (int $g.preStopSeconds) 0 }}
  # Serving on while the pod leaves the Services' endpoints (and proxies' lists); SIGTERM after.
  lifecycle:
    preStop:
      sleep: {seconds: {{ $g.preStopSeconds }}}
  {{- end }}
  resources: {{- toYaml $g.resources | nindent 4 }}
  securityContext: {{- include "samserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp, subPath: gateway}
    {{- if .models }}
    - {name: models, mountPath: /models, readOnly: true}
    {{- end }}
    {{- if eq .transport "shm" }}
    - {name: dshm, mountPath: /dev/shm}
    {{- end }}
    {{- if and (eq $g.auth.mode "api-keys") $g.auth.apiKeysSecret }}
    - {name: api-keys, mountPath: /etc/samserve/keys, readOnly: true}
    {{- end }}
    {{- if and (eq $g.auth.mode "api-keys") $g.auth.jwksSecret }}
    - {name: jwks, mountPath: /etc/samserve/jwks, readOnly: true}
    {{- end }}
    {{- if $g.tls.enabled }}
    - {name: gateway-tls, mountPath: /etc/samserve/tls, readOnly: true}
    {{- end }}
    {{- if $redisUrl }}
    {{- if include "samserve.redisPassword" .root }}
    - {name: redis-password, mountPath: /etc/samserve/redis, readOnly: true}
    {{- end }}
    {{- if $v.redis.tls.enabled }}
    - {name: redis-tls, mountPath: /etc/samserve/redis-tls, readOnly: true}
    {{- end }}
    {{- end }}
{{- end -}}

{{/* The gateway container's Secret volumes. */}}
{{- define "samserve.gatewayVolumes" -}}
{{- $v := .Values -}}
{{- $g := $v.gateway -}}
{{- if and (eq $g.auth.mode "api-keys") $g.auth.apiKeysSecret }}
- name: api-keys
  secret: {secretName: {{ $g.auth.apiKeysSecret }}, items: [{key: keys.json, path: keys.json}]}
{{- end }}
{{- if and (eq $g.auth.mode "api-keys") $g.auth.jwksSecret }}
- name: jwks
  secret: {secretName: {{ $g.auth.jwksSecret }}, items: [{key: jwks.json, path: jwks.json}]}
{{- end }}
{{- if $g.tls.enabled }}
- name: gateway-tls
  secret: {secretName: {{ required "gateway.tls.secretName is required with gateway.tls.enabled" $g.tls.secretName }}}
{{- end }}
{{- if include "samserve.redisUrl" . }}
{{- if include "samserve.redisPassword" . }}
- name: redis-password
  secret: {secretName: {{ include "samserve.redisSecret" . }}, items: [{key: password, path: password}]}
{{- end }}
{{- if $v.redis.tls.enabled }}
- name: redis-tls
  secret: {secretName: {{ required "redis.tls.secretName is required with redis.tls.enabled" $v.redis.tls.secretName }}, items: [{key: ca.crt, path: ca.crt}]}
{{- end }}
{{- end }}
{{- end -}}

{{- define "samserve.topologySpread" -}}
{{- $root := .root -}}
{{- range .spread.topologyKeys }}
- maxSkew: {{ $.spread.maxSkew }}
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels: {{- include "samserve.selector" (dict "root" $root "component" $.component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* `samserve-build prepare` into the model volume (init container or Job). */}}
{{- define "samserve.prepareContainer" -}}
{{- $p := .Values.prepare -}}
- name: prepare
  image: {{ include "samserve.image" (dict "root" . "name" "prepare" "tag" .Chart.AppVersion) }}
  imagePullPolicy: {{ .Values.images.prepare.pullPolicy }}
  env:
    - {name: SAMSERVE_WORKDIR, value: /models}
    - {name: SAMSERVE_MODEL_VARIANT, value: {{ $p.modelVariant | quote }}}
    {{- if $p.checkpoint }}
    - {name: SAMSERVE_CHECKPOINT, value: {{ printf "/checkpoints/%s" $p.checkpoint | quote }}}
    {{- end }}
    - {name: SAMSERVE_RANDOM_SEED, value: {{ $p.randomSeed | quote }}}
    - {name: SAMSERVE_TARGET, value: {{ .Values.servingTarget | quote }}}
    - {name: SAMSERVE_TENSORRT_MAJOR, value: {{ .Values.tensorrtEngines.tensorrtMajor | quote }}}
    - {name: HOME, value: /tmp}
  resources: {{- toYaml $p.resources | nindent 4 }}
  securityContext: {{- include "samserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - {name: models, mountPath: /models}
    - {name: tmp, mountPath: /tmp, subPath: prepare}
    {{- if $p.checkpointVolume }}
    - {name: checkpoints, mountPath: /checkpoints, readOnly: true}
    {{- end }}
{{- end -}}

{{/* Security context of the pods that write the model volume. */}}
{{- define "samserve.modelPodSecurityContext" -}}
securityContext: {{- toYaml .Values.podSecurityContext | nindent 2 }}
  runAsUser: 65532
  runAsGroup: 65532
  fsGroup: 65532
{{- end -}}

{{/* The prepare Job's pod template (its hash names the Job). */}}
{{- define "samserve.preparePod" -}}
metadata:
  labels: {{- include "samserve.selector" (dict "root" . "component" "prepare") | nindent 4 }}
    {{- include "samserve.claimLabel" . | nindent 4 }}
spec:
  {{- with include "samserve.serviceAccountName" . }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  restartPolicy: OnFailure
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- include "samserve.modelPodSecurityContext" . | nindent 2 }}
  {{- with include "samserve.claimAffinity" (dict "root" .) | trim }}{{ . | nindent 2 }}{{ end }}
  containers: {{- include "samserve.prepareContainer" . | nindent 4 }}
  volumes:
    - name: models
      persistentVolumeClaim:
        claimName: {{ include "samserve.modelsClaim" . }}
    - name: tmp
      emptyDir: {sizeLimit: 8Gi}
    {{- with .Values.prepare.checkpointVolume }}
    - name: checkpoints
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}

{{/* The TensorRT engine Job's pod template (its hash names the Job). */}}
{{- define "samserve.tensorrtPod" -}}
{{- $e := .Values.tensorrtEngines -}}
metadata:
  labels: {{- include "samserve.selector" (dict "root" . "component" "tensorrt-engines") | nindent 4 }}
    {{- include "samserve.claimLabel" . | nindent 4 }}
spec:
  {{- with include "samserve.serviceAccountName" . }}
  serviceAccountName: {{ . }}
  {{- end }}
  automountServiceAccountToken: false
  restartPolicy: Never
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- include "samserve.modelPodSecurityContext" . | nindent 2 }}
  {{- with $e.nodeSelector }}
  nodeSelector: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "samserve.claimAffinity" (dict "root" .) | trim }}{{ . | nindent 2 }}{{ end }}
  containers:
    - name: trtexec
      image: {{ include "samserve.image" (dict "root" . "name" "tensorrt" "tag" (printf "%s-py3" .Values.tritonRelease)) }}
      imagePullPolicy: {{ .Values.images.tensorrt.pullPolicy }}
      command: [/bin/bash, -ec]
      args:
        - |
          until [ -f /models/repository/build_engines.sh ]; do sleep 5; done
          bash /models/repository/build_engines.sh /models/repository
      env:
        - {name: HOME, value: /tmp}
        - {name: TRTEXEC, value: {{ $e.trtexec | quote }}}
        # build_engines.sh refuses another TensorRT or GPU kind than the one Triton's pods wait for.
        - {name: EXPECTED_TENSORRT_VERSION, value: {{ include "samserve.tensorrtVersion" . | quote }}}
        {{- with $e.computeCapability }}
        - {name: EXPECTED_COMPUTE_CAPABILITY, value: {{ . | quote }}}
        {{- end }}
      resources:
        requests:
          {{- toYaml $e.resources.requests | nindent 10 }}
          {{ .Values.triton.gpu.resource }}: {{ $e.gpuCount }}
        limits:
          {{- toYaml $e.resources.limits | nindent 10 }}
          {{ .Values.triton.gpu.resource }}: {{ $e.gpuCount }}
      securityContext: {{- include "samserve.containerSecurityContext" . | nindent 8 }}
      volumeMounts:
        - {name: models, mountPath: /models}
        - {name: tmp, mountPath: /tmp}
  volumes:
    - name: models
      persistentVolumeClaim:
        claimName: {{ include "samserve.modelsClaim" . }}
    - name: tmp
      emptyDir: {sizeLimit: 4Gi}
{{- end -}}
