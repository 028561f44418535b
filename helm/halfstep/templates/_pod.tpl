{{/*
The server pod spec, shared by the Deployment and the KServe InferenceService predictor.
Under KServe the container is "kserve-container" and, in Serverless (Knative) mode, the
fields Knative refuses (startupProbe, lifecycle) are left out.
*/}}
{{- define "halfstep.podSpec" -}}
{{- $apiKeySecret := include "halfstep.apiKeySecretName" . }}
{{- $limits := deepCopy (default dict .Values.resources.limits) }}
{{- if .Values.gpu.enabled }}
{{- $_ := set $limits "nvidia.com/gpu" .Values.gpu.count }}
{{- end }}
{{- $resources := deepCopy (default dict .Values.resources) }}
{{- if $limits }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $knative := and .Values.kserve.enabled (eq .Values.kserve.deploymentMode "Serverless") }}
{{- $port := ternary (int .Values.server.port) "http" .Values.kserve.enabled }}
{{- $tolerations := .Values.tolerations }}
{{- if .Values.gpu.enabled }}
{{- $tolerations = append $tolerations (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
serviceAccountName: {{ include "halfstep.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
# At least the server's drain + 5 s (schema: margin >= 5), so in-flight batches finish before
# SIGKILL.
terminationGracePeriodSeconds: {{ include "halfstep.terminationGrace" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- if eq .Values.model.source "image" }}
initContainers:
  - name: copy-model
    image: {{ printf "%s:%s" .Values.model.image.repository .Values.model.image.tag | quote }}
    imagePullPolicy: {{ .Values.model.image.pullPolicy }}
    command: ["cp", "-R", {{ printf "%s/." (trimSuffix "/" .Values.model.image.path) | quote }}, {{ .Values.model.mountPath | quote }}]
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    resources:
      requests:
        cpu: 100m
        memory: 64Mi
      limits:
        memory: 256Mi
    volumeMounts:
      - name: model
        mountPath: {{ .Values.model.mountPath }}
{{- end }}
containers:
  - name: {{ ternary "kserve-container" "server" .Values.kserve.enabled }}
    image: {{ include "halfstep.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    env:
      - name: HALFSTEP_HOST
        value: {{ .Values.server.host | quote }}
      - name: HALFSTEP_PORT
        value: {{ .Values.server.port | int | quote }}
      - name: HALFSTEP_BACKEND
        value: {{ .Values.server.backend | quote }}
      - name: HALFSTEP_MAX_BATCH
        value: {{ .Values.server.maxBatch | int | quote }}
      - name: HALFSTEP_MAX_WAIT_MS
        value: {{ .Values.server.maxWaitMs | quote }}
      - name: HALFSTEP_MAX_WAIT_FRACTION
        value: {{ .Values.server.maxWaitFraction | quote }}
      - name: HALFSTEP_MAX_QUEUE
        value: {{ .Values.server.maxQueue | int | quote }}
      - name: HALFSTEP_TIMEOUT_S
        value: {{ .Values.server.timeoutS | quote }}
      - name: HALFSTEP_DRAIN_S
        value: {{ .Values.server.drainS | quote }}
      - name: HALFSTEP_MAX_BODY_BYTES
        value: {{ .Values.server.maxBodyBytes | int | quote }}
      - name: HALFSTEP_MAX_BACKLOG_S
        value: {{ .Values.server.maxBacklogS | quote }}
      {{- if not (kindIs "invalid" .Values.server.maxTeacherSteps) }}
      - name: HALFSTEP_MAX_TEACHER_STEPS
        value: {{ .Values.server.maxTeacherSteps | int | quote }}
      {{- end }}
      - name: HALFSTEP_TEACHER
        value: {{ .Values.server.teacher | quote }}
      - name: HALFSTEP_MAX_REQUEST_S
        value: {{ .Values.server.maxRequestS | quote }}
      - name: HALFSTEP_WATCHDOG_FACTOR
        value: {{ .Values.server.watchdogFactor | quote }}
      - name: HALFSTEP_AUTH_METRICS
        value: {{ .Values.server.authMetrics | quote }}
      {{- if and (ne .Values.model.source "embedded") .Values.model.bundles }}
      - name: HALFSTEP_BUNDLES
        value: {{ include "halfstep.bundleList" . | quote }}
      {{- else if ne .Values.model.source "embedded" }}
      - name: HALFSTEP_BUNDLE
        value: {{ include "halfstep.bundleDir" . | quote }}
      {{- end }}
      {{- if $apiKeySecret }}
      - name: HALFSTEP_API_KEY
        valueFrom:
          secretKeyRef:
            name: {{ $apiKeySecret }}
            key: {{ .Values.server.apiKey.secretKey }}
      {{- end }}
      - name: XDG_CACHE_HOME
        value: {{ .Values.cache.mountPath | quote }}
      - name: CUDA_CACHE_PATH
        value: {{ printf "%s/nv" .Values.cache.mountPath | quote }}
      {{- with .Values.server.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      - name: {{ ternary "http1" "http" .Values.kserve.enabled }}
        containerPort: {{ .Values.server.port }}
        protocol: TCP
    {{- if not $knative }}
    startupProbe:
      httpGet:
        path: {{ .Values.probes.startup.path }}
        port: {{ $port }}
      periodSeconds: {{ .Values.probes.startup.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.startup.failureThreshold }}
    {{- end }}
    readinessProbe:
      httpGet:
        path: {{ .Values.probes.readiness.path }}
        port: {{ $port }}
      periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
    livenessProbe:
      httpGet:
        path: {{ .Values.probes.liveness.path }}
        port: {{ $port }}
      periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
      timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
    {{- if and (gt (int .Values.server.preStopSleepS) 0) (not $knative) }}
    lifecycle:
      preStop:
        exec:
          command: ["sleep", {{ .Values.server.preStopSleepS | quote }}]
    {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    {{- with $resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: cache
        mountPath: {{ .Values.cache.mountPath }}
      {{- if ne .Values.model.source "embedded" }}
      - name: model
        mountPath: {{ .Values.model.mountPath }}
        readOnly: true
      {{- end }}
volumes:
  - name: tmp
    emptyDir:
      sizeLimit: {{ .Values.tmp.sizeLimit }}
  - name: cache
    emptyDir:
      sizeLimit: {{ .Values.cache.sizeLimit }}
  {{- if eq .Values.model.source "pvc" }}
  - name: model
    persistentVolumeClaim:
      claimName: {{ .Values.model.pvc.claimName }}
      readOnly: true
  {{- else if eq .Values.model.source "image" }}
  - name: model
    emptyDir:
      sizeLimit: {{ .Values.model.sizeLimit }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
