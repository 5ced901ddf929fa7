{{/* Names, labels and images shared by the templates. */}}

{{- define "imagebatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "imagebatch.fullname" -}}
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

{{- define "imagebatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagebatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "imagebatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "imagebatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imagebatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagebatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagebatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "imagebatch.workerImage" -}}
{{- $repository := .Values.worker.image.repository | default .Values.image.repository }}
{{- $tag := .Values.worker.image.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
What the operator does in a namespace it watches, and nothing more:
- ImageBatches: kopf lists and watches them and patches its annotations and finalizer;
  the operator reads one and writes its status subresource. "update" on finalizers is
  what the OwnerReferencesPermissionEnforcement admission plugin asks of a client that
  sets blockOwnerDeletion on the Jobs and Secrets it owner-references to a batch.
- Jobs: one per run, created, read, suspended or resumed (patch), and the earlier runs'
  Jobs listed and deleted.
- Secrets: the webhook signing secret is read; the worker's copy of the storage
  credentials is created (or patched when it exists).
- ConfigMaps: a configMapKeyRef source is read.
- Events: posted on the ImageBatch (kubectl describe).
*/}}
{{- define "imagebatch.namespacedRules" -}}
- apiGroups: [imagebatch.dev]
  resources: [imagebatches]
  verbs: [get, list, watch, patch]
- apiGroups: [imagebatch.dev]
  resources: [imagebatches/status]
  verbs: [get, patch]
- apiGroups: [imagebatch.dev]
  resources: [imagebatches/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
