{{/* Standard names and labels. */}}
{{- define "halfstep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "halfstep.fullname" -}}
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

{{- define "halfstep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "halfstep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "halfstep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "halfstep.labels" -}}
helm.sh/chart: {{ include "halfstep.chart" . }}
{{ include "halfstep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "halfstep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "halfstep.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server image: the CPU build's tag when no GPU is requested. */}}
{{- define "halfstep.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = ternary .Chart.AppVersion (printf "%s-cpu" .Chart.AppVersion) .Values.gpu.enabled }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Name of the Secret holding HALFSTEP_API_KEY, or "" when auth is off. */}}
{{- define "halfstep.apiKeySecretName" -}}
{{- if .Values.server.apiKey.existingSecret }}
{{- .Values.server.apiKey.existingSecret }}
{{- else if .Values.server.apiKey.value }}
{{- printf "%s-api-key" (include "halfstep.fullname" .) }}
{{- end }}
{{- end }}

{{/* The bundle directory inside the pod when it does not come from the image. */}}
{{- define "halfstep.bundleList" -}}
{{- $base := trimSuffix "/" .Values.model.mountPath }}
{{- $specs := list }}
{{- range .Values.model.bundles }}
{{- $specs = append $specs (printf "%s=%s/%s" .name $base (trimPrefix "/" .path)) }}
{{- end }}
{{- join "," $specs }}
{{- end }}

{{- define "halfstep.bundleDir" -}}
{{- $base := trimSuffix "/" .Values.model.mountPath }}
{{- if .Values.model.bundlePath }}
{{- printf "%s/%s" $base (trimPrefix "/" .Values.model.bundlePath) }}
{{- else }}
{{- $base }}
{{- end }}
{{- end }}

{{/* Pod termination budget: preStop sleep, then the server's drain, then a margin. */}}
{{- define "halfstep.terminationGrace" -}}
{{- add .Values.server.preStopSleepS (ceil .Values.server.drainS | int) .Values.server.terminationGraceMarginS }}
{{- end }}

{{/*
Cross-field rules the JSON schema cannot word clearly; each fails the install with a message.
*/}}
{{- define "halfstep.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are both true: KEDA creates its own HPA, so enable one of them" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is larger than autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- fail "keda.minReplicas is larger than keda.maxReplicas" }}
{{- end }}
{{- if and (eq .Values.server.backend "cudagraph" "tensorrt") (not .Values.gpu.enabled) }}
{{- fail (printf "server.backend=%s needs a GPU: set gpu.enabled=true or choose auto, torch or onnxruntime" .Values.server.backend) }}
{{- end }}
{{- if and .Values.kserve.enabled (or .Values.autoscaling.enabled .Values.keda.enabled) }}
{{- fail "kserve.enabled with autoscaling.enabled or keda.enabled: KServe scales the predictor itself (kserve.minReplicas, kserve.maxReplicas)" }}
{{- end }}
{{- if and .Values.kserve.enabled .Values.serviceMonitor.enabled }}
{{- fail "kserve.enabled with serviceMonitor.enabled: the chart makes no Service under KServe; scrape the predictor pods another way" }}
{{- end }}
{{- if and .Values.kserve.enabled (gt (int .Values.kserve.minReplicas) (int .Values.kserve.maxReplicas)) (gt (int .Values.kserve.maxReplicas) 0) }}
{{- fail "kserve.minReplicas is larger than kserve.maxReplicas" }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable) }}
{{- fail "podDisruptionBudget.enabled needs minAvailable or maxUnavailable" }}
{{- end }}
{{- end }}
