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
  {{- if and (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) }}
    {{- fail "\n\npodDisruptionBudget.enabled needs podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable." }}
  {{- end }}
{{- end }}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) (int $v.containerPort)) }}
  {{- fail "\n\nmetrics.port must differ from containerPort (gRPC)." }}
{{- end }}
{{- if eq (int $v.healthPort) (int $v.containerPort) }}
  {{- fail "\n\nhealthPort must differ from containerPort: the health listener is a separate plaintext port for the kubelet's probes." }}
{{- end }}
{{- if and $v.metrics.enabled (eq (int $v.metrics.port) (int $v.healthPort)) }}
  {{- fail "\n\nmetrics.port must differ from healthPort." }}
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
