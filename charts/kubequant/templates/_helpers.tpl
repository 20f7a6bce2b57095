{{/* Chart name, overridable. */}}
{{- define "kubequant.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: a DNS-1123 label of at most 63 characters. */}}
{{- define "kubequant.fullname" -}}
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

{{/* Name of cluster-scoped objects: unique per release namespace too. */}}
{{- define "kubequant.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "kubequant.fullname" .) }}
{{- end }}

{{- define "kubequant.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubequant.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubequant.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubequant.labels" -}}
helm.sh/chart: {{ include "kubequant.chart" . }}
{{ include "kubequant.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubequant
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The annotations block of an object's metadata: commonAnnotations merged with the object's own.
Call as {{- include "kubequant.annotations" (dict "ctx" $ "extra" $own) }} right under the labels.
*/}}
{{- define "kubequant.annotations" -}}
{{- $a := merge (deepCopy (.extra | default dict)) .ctx.Values.commonAnnotations }}
{{- with $a }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end }}

{{- define "kubequant.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubequant.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: the digest wins when set. */}}
{{- define "kubequant.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository (required (printf "a tag or a digest is required for %s" .repository) .tag) }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches (namespaced mode), as a JSON list. */}}
{{- define "kubequant.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toJson (uniq .Values.operator.watchNamespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/* Permissions the operator needs on its own resource and on what it creates, per namespace. */}}
{{- define "kubequant.rules" -}}
# Watch QuantizedModels; kopf patches them (finalizers, its annotations) and their status.
- apiGroups: ["kubequant.io"]
  resources: ["quantizedmodels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubequant.io"]
  resources: ["quantizedmodels/status"]
  verbs: ["get", "patch"]
# Children carry ownerReferences with blockOwnerDeletion, which needs update on the owner's finalizers.
- apiGroups: ["kubequant.io"]
  resources: ["quantizedmodels/finalizers"]
  verbs: ["update"]
# Children the operator watches (kopf events on Jobs and Deployments) and applies server-side:
# quantize/evaluate/cleanup Jobs and the vLLM Deployment.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Children it reads by name and applies: the vLLM Service, the artifact PVC, the
# PodDisruptionBudget and the ServiceMonitor.
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "create", "patch", "delete"]
# Serving across nodes (serving.nodes > 1): the LeaderWorkerSet, watched like the Deployment.
- apiGroups: ["leaderworkerset.x-k8s.io"]
  resources: ["leaderworkersets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# serving.autoscaling and serving.inferencePool: the autoscaler and the pool, read by name and applied.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "create", "patch", "delete"]
# The Jobs' Pods: their termination messages carry the results of quantize and evaluate, and a Pod
# the scheduler cannot place (or whose image cannot be pulled) changes no Job status: it is watched.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# An Event on every phase transition (kopf posts core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
