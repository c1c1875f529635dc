{{/* Chart name, overridable. */}}
{{- define "nerve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the resources: release name, plus the chart name unless the release name contains it. */}}
{{- define "nerve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "nerve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the pods; never change them (Deployment selectors are immutable). */}}
{{- define "nerve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nerve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "nerve.labels" -}}
helm.sh/chart: {{ include "nerve.chart" . }}
{{ include "nerve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "nerve.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nerve
{{- end }}

{{/* The metrics Service (ClusterIP, metrics port only) and the labels the ServiceMonitor selects it by. */}}
{{- define "nerve.metricsServiceName" -}}
{{- printf "%s-metrics" (include "nerve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nerve.metricsSelectorLabels" -}}
app.kubernetes.io/name: {{ include "nerve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: metrics
{{- end }}

{{- define "nerve.metricsLabels" -}}
helm.sh/chart: {{ include "nerve.chart" . }}
{{ include "nerve.metricsSelectorLabels" . }}
app.kubernetes.io/version: {{ include "nerve.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nerve
{{- end }}

{{- define "nerve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nerve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "nerve.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "nerve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "nerve.imageTag" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart creates from postgres.url / redis.url. */}}
{{- define "nerve.secretName" -}}
{{- printf "%s-backends" (include "nerve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "true" when the chart creates a Secret (production mode with a URL given as a value). */}}
{{- define "nerve.createSecret" -}}
{{- if and (eq .Values.mode "production") (or .Values.postgres.url .Values.redis.url) }}true{{ end }}
{{- end }}

{{/* Where the TLS, client CA, JWT and policy volumes are mounted (whole directories, read-only). */}}
{{- define "nerve.tlsDir" -}}/etc/nerve/tls{{- end }}
{{- define "nerve.clientCADir" -}}/etc/nerve/client-ca{{- end }}
{{- define "nerve.jwtDir" -}}/etc/nerve/jwt{{- end }}
{{- define "nerve.policyDir" -}}/etc/nerve/policy{{- end }}

{{/* "true" when clients must authenticate: mTLS (a client CA) or JWT. */}}
{{- define "nerve.authEnabled" -}}
{{- if or (and .Values.tls.enabled .Values.tls.clientCA.existingSecret) .Values.auth.jwt.enabled }}true{{ end }}
{{- end }}

{{/* "true" when a policy file is mounted (an existing ConfigMap or the inline policy). */}}
{{- define "nerve.policyEnabled" -}}
{{- if or .Values.auth.policy.existingConfigMap .Values.auth.policy.inline }}true{{ end }}
{{- end }}

{{/* The ConfigMap holding the policy: the existing one or the chart's. */}}
{{- define "nerve.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "nerve.fullname" .) | trunc 63 | trimSuffix "-") .Values.auth.policy.existingConfigMap }}
{{- end }}

{{/* Key of the policy in its ConfigMap (the chart's always uses policy.toml). */}}
{{- define "nerve.policyKey" -}}
{{- if .Values.auth.policy.existingConfigMap }}{{ .Values.auth.policy.key }}{{ else }}policy.toml{{ end }}
{{- end }}

{{/*
Mode of the Secret files: owner and group read (0440) when the pod has an fsGroup, which kubelet gives
the files, so the non-root user reads them; world-readable (0444) otherwise.
*/}}
{{- define "nerve.secretMode" -}}
{{- if (.Values.podSecurityContext | default dict).fsGroup }}288{{ else }}292{{ end }}
{{- end }}

{{/* Claim of the data directory: the existing one or the chart's. */}}
{{- define "nerve.claimName" -}}
{{- default (printf "%s-data" (include "nerve.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/*
A value as an environment variable string: integers as integers (Helm reads YAML numbers as floats,
which would print as 1e+06), everything else as is.
*/}}
{{- define "nerve.envValue" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) }}
{{- int64 . | toString }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Seconds in a duration written as units summed ("5s", "1m30s", "500ms", "2h"); empty for any other
form humantime takes ("30 sec"), which the grace period check then leaves alone.
*/}}
{{- define "nerve.seconds" -}}
{{- $d := toString . -}}
{{- if regexMatch "^([0-9]+(ms|s|m|h))+$" $d -}}
  {{- $total := 0.0 -}}
  {{- range regexFindAll "[0-9]+(ms|s|m|h)" $d -1 -}}
    {{- $n := float64 (regexFind "^[0-9]+" .) -}}
    {{- $unit := regexReplaceAll "^[0-9]+" . "" -}}
    {{- $scale := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit -}}
    {{- $total = addf $total (mulf $n $scale) -}}
  {{- end -}}
  {{- $total -}}
{{- end -}}
{{- end -}}

{{/*
Checks that the values describe a deployment that can work; fails rendering with a message naming the
values otherwise.
*/}}
{{- define "nerve.validate" -}}
{{- $v := .Values }}
{{- $delay := include "nerve.seconds" $v.config.shutdownDelay }}
{{- $timeout := include "nerve.seconds" $v.config.shutdownTimeout }}
{{- $grace := $v.terminationGracePeriodSeconds }}
{{- /* 5 s left after both for the server's exit (the spans' last export) */}}
{{- if and $delay $timeout (not (kindIs "invalid" $grace)) }}
  {{- if gt (addf $delay $timeout 5) (float64 $grace) }}
    {{- fail (printf "\n\nconfig.shutdownDelay (%s) + config.shutdownTimeout (%s) must leave at least 5s of terminationGracePeriodSeconds (%v): Kubernetes kills the pod when the grace period ends, cutting the hand-back of group deliveries and in-flight publishes. Raise terminationGracePeriodSeconds, or lower the two." (toString $v.config.shutdownDelay) (toString $v.config.shutdownTimeout) $grace) }}
  {{- end }}
{{- end }}
{{- if eq $v.mode "embedded" }}
  {{- if gt (int $v.replicaCount) 1 }}
    {{- fail (printf "\n\nmode=embedded keeps the event store in one SQLite file, so it runs exactly one replica, but replicaCount is %d.\nSet replicaCount=1, or use mode=production with Postgres and Redis (postgres.existingSecret, redis.existingSecret) for several replicas." (int $v.replicaCount)) }}
  {{- end }}
  {{- if $v.autoscaling.enabled }}
    {{- fail "\n\nmode=embedded runs exactly one replica, so it cannot be autoscaled: set autoscaling.enabled=false, or use mode=production with Postgres and Redis." }}
  {{- end }}
  {{- if $v.podDisruptionBudget.enabled }}
    {{- fail "\n\nmode=embedded runs exactly one replica; a PodDisruptionBudget would block every node drain. Set podDisruptionBudget.enabled=false, or use mode=production." }}
  {{- end }}
  {{- if or $v.postgres.url $v.postgres.existingSecret $v.redis.url $v.redis.existingSecret }}
    {{- fail "\n\npostgres.* / redis.* are set but mode=embedded does not use them: set mode=production to run on Postgres and Redis." }}
  {{- end }}
{{- else if eq $v.mode "production" }}
  {{- range $name := list "postgres" "redis" }}
    {{- $b := index $v $name }}
    {{- if and $b.url $b.existingSecret }}
      {{- fail (printf "\n\nset only one of %s.url and %s.existingSecret." $name $name) }}
    {{- end }}
    {{- if not (or $b.url $b.existingSecret) }}
      {{- fail (printf "\n\nmode=production needs both Postgres and Redis: set %s.existingSecret (a Secret whose key %s.secretKey holds the URL) or %s.url." $name $name $name) }}
    {{- end }}
    {{- if and $b.existingSecret (not $b.secretKey) }}
      {{- fail (printf "\n\n%s.secretKey must name the key of the URL in %s.existingSecret." $name $name) }}
    {{- end }}
  {{- end }}
{{- else }}
  {{- fail (printf "\n\nmode must be embedded or production, not %q." (toString $v.mode)) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
  {{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
    {{- fail (printf "\n\nautoscaling.minReplicas (%d) is greater than autoscaling.maxReplicas (%d)." (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
  {{- end }}
  {{- if not (or $v.autoscaling.targetCPUUtilizationPercentage $v.autoscaling.targetMemoryUtilizationPercentage) }}
    {{- fail "\n\nautoscaling.enabled needs a target: set autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage." }}
  {{- end }}
  {{- $requests := (($v.resources | default dict).requests | default dict) }}
  {{- if and $v.autoscaling.targetCPUUtilizationPercentage (not $requests.cpu) }}
    {{- fail "\n\nautoscaling.targetCPUUtilizationPercentage is a percentage of the CPU request: set resources.requests.cpu." }}
  {{- end }}
  {{- if and $v.autoscaling.targetMemoryUtilizationPercentage (not $requests.memory) }}
    {{- fail "\n\nautoscaling.targetMemoryUtilizationPercentage is a percentage of the memory request: set resources.requests.memory." }}
  {{- end }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
  {{- $p := $v.podDisruptionBudget }}
  {{- if and (kindIs "invalid" $p.minAvailable) (kindIs "invalid" $p.maxUnavailable) }}
    {{- fail "\n\npodDisruptionBudget.enabled needs podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable." }}
  {{- end }}
  {{- /* a budget no eviction can meet blocks every node drain; percentages other than 100% / 0% depend on
  the replica count at the time and are left alone */}}
  {{- $floorName := ternary "autoscaling.minReplicas" "replicaCount" (eq $v.autoscaling.enabled true) }}
  {{- $floor := int64 (ternary $v.autoscaling.minReplicas $v.replicaCount (eq $v.autoscaling.enabled true)) }}
  {{- $fix := "Lower podDisruptionBudget.minAvailable, or use podDisruptionBudget.maxUnavailable (e.g. 1) with minAvailable unset (null)." }}
  {{- if not (kindIs "invalid" $p.minAvailable) }}
    {{- if kindIs "string" $p.minAvailable }}
      {{- if ge (int64 (trimSuffix "%" $p.minAvailable)) 100 }}
        {{- fail (printf "\n\npodDisruptionBudget.minAvailable is %s: no pod may ever be evicted, so every node drain is blocked.\n%s" $p.minAvailable $fix) }}
      {{- end }}
    {{- else if and (gt (int64 $p.minAvailable) 0) (ge (int64 $p.minAvailable) $floor) }}
      {{- fail (printf "\n\npodDisruptionBudget.minAvailable (%d) is not below %s (%d): with that many replicas no pod may be evicted, so every node drain is blocked.\n%s" (int64 $p.minAvailable) $floorName $floor $fix) }}
    {{- end }}
  {{- else if or (and (kindIs "string" $p.maxUnavailable) (regexMatch "^0+%$" (toString $p.maxUnavailable))) (and (not (kindIs "string" $p.maxUnavailable)) (eq (int64 $p.maxUnavailable) 0)) }}
    {{- fail (printf "\n\npodDisruptionBudget.maxUnavailable is %v: no pod may ever be evicted, so every node drain is blocked. Set it to 1 or more." $p.maxUnavailable) }}
  {{- end }}
{{- end }}
{{- /* every pair of the container's ports (the gRPC Service port and the metrics port are on separate Services) */}}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) (int $v.containerPort)) }}
  {{- fail (printf "\n\nmetrics.port (%d) must differ from containerPort (%d) (gRPC)." (int $v.metrics.port) (int $v.containerPort)) }}
{{- end }}
{{- if eq (int $v.healthPort) (int $v.containerPort) }}
  {{- fail (printf "\n\nhealthPort (%d) must differ from containerPort (%d): the health listener is a separate plaintext port for the kubelet's probes." (int $v.healthPort) (int $v.containerPort)) }}
{{- end }}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) (int $v.healthPort)) }}
  {{- fail (printf "\n\nmetrics.port (%d) must differ from healthPort (%d)." (int $v.metrics.port) (int $v.healthPort)) }}
{{- end }}
{{- /* intervals the server refuses when zero (Config::check): it would check or sample in a loop without a pause */}}
{{- range $interval := list (list "config.healthCheckInterval" $v.config.healthCheckInterval "health_check_interval") (list "metrics.groupSampleInterval" $v.metrics.groupSampleInterval "metrics.group_sample_interval") }}
  {{- if not (regexMatch "[1-9]" (toString (index $interval 1))) }}
    {{- fail (printf "\n\n%s (%s) must be positive: the server refuses a zero interval (\"%s must be positive\") and would not start." (index $interval 0) (toString (index $interval 1)) (index $interval 2)) }}
  {{- end }}
{{- end }}
{{- /* the data volume must not share a path with the chart's other mounts */}}
{{- $dataDir := clean (toString $v.persistence.mountPath) | trimSuffix "/" }}
{{- range $mount := list (list "/tmp" "SQLite's temporary files") (list (include "nerve.tlsDir" .) "TLS") (list (include "nerve.clientCADir" .) "client CA") (list (include "nerve.jwtDir" .) "JWT keys") (list (include "nerve.policyDir" .) "policy") }}
  {{- $other := index $mount 0 }}
  {{- if or (eq $dataDir $other) (hasPrefix (printf "%s/" $dataDir) $other) (hasPrefix (printf "%s/" $other) $dataDir) }}
    {{- fail (printf "\n\npersistence.mountPath (%s) overlaps the chart's mount %s (%s): give the data directory a path of its own, e.g. /var/lib/nerve." (toString $v.persistence.mountPath) $other (index $mount 1)) }}
  {{- end }}
{{- end }}
{{- /* the API refuses a rolling update that may neither add nor remove a pod */}}
{{- if and (eq $v.mode "production") (ne $v.updateStrategy.type "Recreate") }}
  {{- $zero := list }}
  {{- range $x := list $v.updateStrategy.maxSurge $v.updateStrategy.maxUnavailable }}
    {{- if kindIs "string" $x }}
      {{- $zero = append $zero (regexMatch "^0+%$" $x) }}
    {{- else }}
      {{- $zero = append $zero (eq (int64 $x) 0) }}
    {{- end }}
  {{- end }}
  {{- if and (index $zero 0) (index $zero 1) }}
    {{- fail (printf "\n\nupdateStrategy.maxSurge (%v) and updateStrategy.maxUnavailable (%v) are both zero: Kubernetes refuses a rolling update that can neither add nor remove a pod.\nSet one of them above zero, or updateStrategy.type=Recreate to stop every old pod before new ones start." $v.updateStrategy.maxSurge $v.updateStrategy.maxUnavailable) }}
  {{- end }}
{{- end }}
{{- if and $v.metrics.serviceMonitor.enabled (not $v.metrics.enabled) }}
  {{- fail "\n\nmetrics.serviceMonitor.enabled needs metrics.enabled=true (the ServiceMonitor scrapes the Service's metrics port)." }}
{{- end }}
{{- /* TLS and mTLS */}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
  {{- fail "\n\ntls.enabled needs tls.existingSecret: the name of a kubernetes.io/tls Secret with tls.crt and tls.key (e.g. a cert-manager Certificate's secretName)." }}
{{- end }}
{{- if and (not $v.tls.enabled) $v.tls.existingSecret }}
  {{- fail "\n\ntls.existingSecret is set but tls.enabled=false: set tls.enabled=true to serve gRPC over TLS." }}
{{- end }}
{{- if and $v.tls.clientCA.existingSecret (not $v.tls.enabled) }}
  {{- fail "\n\ntls.clientCA.existingSecret (mTLS) needs TLS: set tls.enabled=true and tls.existingSecret." }}
{{- end }}
{{- if and $v.tls.clientCA.existingSecret (not $v.tls.clientCA.key) }}
  {{- fail "\n\ntls.clientCA.key must name the key of the CA bundle in tls.clientCA.existingSecret." }}
{{- end }}
{{- if and $v.tls.clientCA.existingSecret (eq $v.tls.clientAuth "optional") (not $v.auth.jwt.enabled) }}
  {{- fail "\n\ntls.clientAuth=optional lets clients without a certificate in to authenticate with a JWT, but auth.jwt.enabled=false: set tls.clientAuth=required, or configure auth.jwt." }}
{{- end }}
{{- /* JWT */}}
{{- with $v.auth.jwt }}
{{- if .enabled }}
  {{- if not (and .issuer .audience) }}
    {{- fail "\n\nauth.jwt.enabled needs auth.jwt.issuer and auth.jwt.audience (the required iss and aud claims)." }}
  {{- end }}
  {{- if not .existingSecret }}
    {{- fail "\n\nauth.jwt.enabled needs auth.jwt.existingSecret: a Secret holding the verification keys (a JWKS, an HMAC secret or PEM public keys)." }}
  {{- end }}
  {{- if not (or .jwksKey .hsSecretKey .publicKeyKeys) }}
    {{- fail "\n\nauth.jwt.enabled needs a key: set auth.jwt.jwksKey, auth.jwt.hsSecretKey or auth.jwt.publicKeyKeys (keys of auth.jwt.existingSecret)." }}
  {{- end }}
  {{- if not .algorithms }}
    {{- fail "\n\nauth.jwt.enabled needs auth.jwt.algorithms, e.g. [RS256]." }}
  {{- end }}
  {{- $hs := false }}
  {{- range .algorithms }}{{ if hasPrefix "HS" . }}{{ $hs = true }}{{ end }}{{ end }}
  {{- if and $hs (not .hsSecretKey) }}
    {{- fail "\n\nauth.jwt.algorithms has an HS* algorithm but auth.jwt.hsSecretKey is empty." }}
  {{- end }}
{{- end }}
{{- end }}
{{- /* policy */}}
{{- if and $v.auth.policy.existingConfigMap $v.auth.policy.inline }}
  {{- fail "\n\nset only one of auth.policy.existingConfigMap and auth.policy.inline." }}
{{- end }}
{{- if and $v.auth.policy.existingConfigMap (not $v.auth.policy.key) }}
  {{- fail "\n\nauth.policy.key must name the key of the policy in auth.policy.existingConfigMap." }}
{{- end }}
{{- if and (include "nerve.policyEnabled" .) (not (include "nerve.authEnabled" .)) }}
  {{- fail "\n\nauth.policy.existingConfigMap or auth.policy.inline is set, but no caller can be identified: the policy names principals (client certificates, JWT subjects),\nand the server refuses a policy without authentication (\"auth.policy_file needs a way to identify callers\") and would not start.\nConfigure mTLS (tls.enabled, tls.existingSecret, tls.clientCA.existingSecret) or JWT (auth.jwt.enabled, auth.jwt.existingSecret, ...), or leave the policy out." }}
{{- end }}
{{- /* no authentication at all: only when asked for */}}
{{- if and (not (include "nerve.authEnabled" .)) (not $v.auth.allowInsecure) }}
  {{- fail "\n\nno authentication is configured and auth.allowInsecure=false: the server would refuse to listen.\nConfigure mTLS (tls.enabled, tls.existingSecret, tls.clientCA.existingSecret) or JWT (auth.jwt.enabled, auth.jwt.existingSecret, ...),\nor set auth.allowInsecure=true to run without authentication (NERVE_INSECURE=true; anyone who reaches the gRPC port may publish and subscribe)." }}
{{- end }}
{{- end }}

{{/* An IntOrString value: numbers as integers, strings ("25%") quoted. */}}
{{- define "nerve.intOrString" -}}
{{- if kindIs "string" . }}{{ quote . }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}
