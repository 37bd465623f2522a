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

{{- define "samserve.tritonImage" -}}
{{- $tag := ternary (printf "%s-%s" .Chart.AppVersion .Values.tritonRelease) (printf "%s-cpu" .Chart.AppVersion) (gt (int .Values.triton.gpu.count) 0) -}}
{{- include "samserve.image" (dict "root" . "name" "triton" "tag" $tag) -}}
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
{{- default (include "samserve.name" (dict "root" . "part" "redis")) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* "true" when the gateways send a Redis password: standalone (the chart's Redis), or a given Secret. */}}
{{- define "samserve.redisPassword" -}}
{{- if or (eq .Values.redis.mode "standalone") (and (ne .Values.redis.mode "none") .Values.redis.auth.existingSecret) -}}true{{- end -}}
{{- end -}}

{{/* The Redis URL the gateways use ("" = no tier 2). */}}
{{- define "samserve.redisUrl" -}}
{{- if eq .Values.redis.mode "standalone" -}}
{{- printf "%s://%s:6379/0" (ternary "rediss" "redis" .Values.redis.tls.enabled) (include "samserve.name" (dict "root" . "part" "redis")) -}}
{{- else if has .Values.redis.mode (list "external" "cluster") -}}
{{- required "redis.url is required for redis.mode external and cluster" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The gateway container. .transport: shm (sidecar) or grpc (own Deployment); .tritonHost. */}}
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
  resources: {{- toYaml $g.resources | nindent 4 }}
  securityContext: {{- include "samserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp, subPath: gateway}
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
