{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "adadepth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name when it already holds the chart name.
Kept to 50 characters so that "<fullname>-tier-<depth>" stays a valid Service name.
*/}}
{{- define "adadepth.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "adadepth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/). */}}
{{- define "adadepth.labels" -}}
helm.sh/chart: {{ include "adadepth.chart" . }}
{{ include "adadepth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: adadepth
{{- end }}

{{- define "adadepth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adadepth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* "server" in single-server mode, "gateway" when tiers are set. */}}
{{- define "adadepth.component" -}}
{{- if .Values.tiers }}gateway{{ else }}server{{ end }}
{{- end }}

{{/* Name of one tier's Deployment and Service; call with (list $ depth). */}}
{{- define "adadepth.tierName" -}}
{{- $root := index . 0 }}
{{- printf "%s-tier-%d" (include "adadepth.fullname" $root) (int (index . 1)) }}
{{- end }}

{{- define "adadepth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "adadepth.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The adadepth image; the tag defaults to "<appVersion>-cuda" or "<appVersion>-cpu". */}}
{{- define "adadepth.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "cuda" "cpu" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "adadepth.device" -}}
{{- .Values.device | default (ternary "cuda" "cpu" .Values.gpu.enabled) }}
{{- end }}

{{/* Name of the Secret holding the API key; empty when no key is configured. */}}
{{- define "adadepth.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "adadepth.fullname" .) }}
{{- end }}
{{- end }}

{{- define "adadepth.modelsClaimName" -}}
{{- if eq .Values.modelStorage.source "existingClaim" }}
{{- required "modelStorage.existingClaim is required when modelStorage.source is existingClaim" .Values.modelStorage.existingClaim }}
{{- else }}
{{- printf "%s-models" (include "adadepth.fullname" .) }}
{{- end }}
{{- end }}

{{/* Pod volumes shared by every workload: models, /dev/shm. */}}
{{- define "adadepth.volumes" -}}
- name: models
{{- if eq .Values.modelStorage.source "image" }}
  emptyDir:
    sizeLimit: {{ .Values.modelStorage.emptyDirSizeLimit }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "adadepth.modelsClaimName" . }}
{{- end }}
{{- if .Values.shm.enabled }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
{{- end }}
{{- end }}

{{- define "adadepth.volumeMounts" -}}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
{{- if .Values.shm.enabled }}
- name: dshm
  mountPath: /dev/shm
{{- end }}
{{- end }}

{{/* Environment of adadepth containers: cache dir and API key. */}}
{{- define "adadepth.env" -}}
- name: ADADEPTH_CACHE_DIR
  value: {{ printf "%s/cache" (trimSuffix "/" .Values.modelStorage.mountPath) | quote }}
- name: HF_HOME
  value: {{ printf "%s/hf" (trimSuffix "/" .Values.modelStorage.mountPath) | quote }}
{{- end }}

{{- define "adadepth.apiKeyEnv" -}}
{{- $secret := include "adadepth.apiKeySecretName" . }}
{{- if $secret }}
- name: ADADEPTH_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- end }}

{{/* Resources with the GPU added as both request and limit; call with (list $ resources withGpu). */}}
{{- define "adadepth.resources" -}}
{{- $root := index . 0 }}
{{- $res := deepCopy (index . 1 | default dict) }}
{{- if and (index . 2) $root.Values.gpu.enabled }}
{{- $gpu := dict $root.Values.gpu.resourceName (int $root.Values.gpu.count) }}
{{- $_ := set $res "limits" (merge (deepCopy (get $res "limits" | default dict)) $gpu) }}
{{- $_ := set $res "requests" (merge (deepCopy (get $res "requests" | default dict)) $gpu) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Startup, readiness and liveness probes on GET /health; call with (list $ portName). */}}
{{- define "adadepth.probes" -}}
{{- $root := index . 0 }}
{{- $port := index . 1 }}
{{- range $kind := list "startupProbe" "readinessProbe" "livenessProbe" }}
{{- $p := index $root.Values $kind }}
{{ $kind }}:
  httpGet:
    path: /health
    port: {{ $port }}
  periodSeconds: {{ $p.periodSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
{{- end }}
{{- end }}

{{- define "adadepth.podAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.containerPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Autoscaling settings of one tier (tier.autoscaling over the top-level autoscaling). */}}
{{- define "adadepth.tierAutoscaling" -}}
{{- $root := index . 0 }}
{{- $tier := index . 1 }}
{{- $a := $tier.autoscaling | default dict }}
{{- $enabled := $root.Values.autoscaling.enabled }}
{{- if hasKey $a "enabled" }}{{ $enabled = $a.enabled }}{{ end }}
{{- $min := $root.Values.autoscaling.minReplicas }}
{{- if hasKey $a "minReplicas" }}{{ $min = $a.minReplicas }}{{ end }}
{{- $max := $root.Values.autoscaling.maxReplicas }}
{{- if hasKey $a "maxReplicas" }}{{ $max = $a.maxReplicas }}{{ end }}
{{- dict "enabled" $enabled "minReplicas" $min "maxReplicas" $max "query" ($a.query | default "") | toJson }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the drain, then a margin, so that SIGKILL
never cuts a drain short.
*/}}
{{- define "adadepth.terminationGracePeriod" -}}
{{- add .Values.shutdown.preStopSeconds .Values.shutdown.timeoutSeconds 10 }}
{{- end }}

{{/*
The preStop hook: sleep while the endpoint removal reaches every proxy, before SIGTERM.
*/}}
{{- define "adadepth.lifecycle" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", {{ .Values.shutdown.preStopSeconds | int | toString | quote }}]
{{- end }}
