{{/* Names, labels and shared snippets of the vitaserve chart. */}}

{{- define "vitaserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vitaserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vitaserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "vitaserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vitaserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one workload: (dict "root" $ "component" "orchestrator") */}}
{{- define "vitaserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vitaserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "vitaserve.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "vitaserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-orchestrator" (include "vitaserve.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Name of the Triton Service of a component short name: (dict "root" $ "name" "llm") */}}
{{- define "vitaserve.tritonService" -}}
{{- printf "%s-triton-%s" (include "vitaserve.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Settings of one Triton component: the defaults overridden by the component's own keys. */}}
{{- define "vitaserve.tritonComponent" -}}
{{- $merged := mergeOverwrite (deepCopy .root.Values.triton.defaults) (deepCopy .values) -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* The Secret and key holding the Redis URL. */}}
{{- define "vitaserve.redisSecretName" -}}
{{- if .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- printf "%s-redis-url" (include "vitaserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "vitaserve.redisSecretKey" -}}
{{- if .Values.redis.external.existingSecret -}}{{ .Values.redis.external.secretKey }}{{- else -}}url{{- end -}}
{{- end -}}

{{- define "vitaserve.redisBundled" -}}
{{- if and (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "vitaserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "vitaserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* Container securityContext with the image's numeric user: (dict "root" $ "uid" 1000) */}}
{{- define "vitaserve.containerSecurityContext" -}}
{{- $ctx := merge (dict "runAsUser" (int .uid) "runAsGroup" (int .uid)) (deepCopy .root.Values.containerSecurityContext) -}}
{{- toYaml $ctx -}}
{{- end -}}

{{/* An HPA: (dict "root" $ "name" <object name> "target" <Deployment name> "spec" <autoscaling values> "component" <label>) */}}
{{- define "vitaserve.hpa" -}}
{{- if .spec.enabled }}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- include "vitaserve.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .target }}
  minReplicas: {{ .spec.minReplicas }}
  maxReplicas: {{ .spec.maxReplicas }}
  metrics:
  {{- if .spec.metrics }}
    {{- toYaml .spec.metrics | nindent 4 }}
  {{- else }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .spec.targetCPUUtilizationPercentage }}
  {{- end }}
  {{- with .spec.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget: (dict "root" $ "name" <name> "spec" <pdb values> "component" <label>) */}}
{{- define "vitaserve.pdb" -}}
{{- if .spec.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- include "vitaserve.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if hasKey .spec "minAvailable" }}
  minAvailable: {{ .spec.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .spec.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "vitaserve.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The gateway's upstream, unless gateway.orchestratorAddress: every orchestrator replica, through the headless
Service's DNS (the gateway balances its streams round-robin over them). */}}
{{- define "vitaserve.orchestratorAddress" -}}
{{- if .Values.gateway.orchestratorAddress -}}
{{- .Values.gateway.orchestratorAddress -}}
{{- else -}}
{{- printf "dns:///%s-orchestrator-headless:%v" (include "vitaserve.fullname" .) .Values.orchestrator.service.port -}}
{{- end -}}
{{- end -}}

{{/* An egress rule to the cluster DNS (networkPolicy.dns), for pods whose other egress is denied. */}}
{{- define "vitaserve.dnsEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
{{- end -}}
