{{/* Chart name, overridable. */}}
{{- define "kuberlhf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: the release name, plus the chart name unless the release name already holds it. */}}
{{- define "kuberlhf.fullname" -}}
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

{{- define "kuberlhf.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kuberlhf.labels" -}}
helm.sh/chart: {{ include "kuberlhf.chart" . }}
app.kubernetes.io/name: {{ include "kuberlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kuberlhf
{{- end }}

{{- define "kuberlhf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kuberlhf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kuberlhf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kuberlhf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kuberlhf.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- end }}

{{/* The namespaces watched in namespaced mode: the listed ones, or the release namespace. */}}
{{- define "kuberlhf.watchNamespaces" -}}
{{- if .Values.watch.namespaces }}
{{- toJson (uniq .Values.watch.namespaces) }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{/*
RBAC rules the operator needs in every namespace it watches: exactly the verbs kuberlhf_operator and kopf use.
kopf lists/watches pipelines, Jobs, Pods, Deployments, Services and NetworkPolicies (the operator reads its
children from those watch streams) and patches its annotations onto pipelines; the operator
reads a pipeline (get), writes its status (patch), creates Jobs/Services/Deployments, lists what it owns, patches
a Job's suspend, deletes superseded Jobs, reads failed pods' logs, posts core/v1 Events (kopf too), lists the
Events of a Job that has no pods (the Job controller's FailedCreate: why the API server refuses its pods) and reads
the Secret named in spec.storage.secretRef (pods read the keys themselves). Nothing is updated, nothing else
deleted.
*/}}
{{- define "kuberlhf.namespacedRules" -}}
- apiGroups: [kuberlhf.io]
  resources: [rlhfpipelines]
  verbs: [get, list, watch, patch]
- apiGroups: [kuberlhf.io]
  resources: [rlhfpipelines/status]
  verbs: [patch]
# Children carry blockOwnerDeletion (foreground deletion of a pipeline waits for them); the API server lets only
# those who may update the owner's finalizers set it.
- apiGroups: [kuberlhf.io]
  resources: [rlhfpipelines/finalizers]
  verbs: [update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [create, list, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [create, list, watch]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
# get: the keys a pipeline's spec.storage.secretRef names; create: the chat's generated API-key Secret (never
# list, update or delete: the operator cannot read or change other Secrets wholesale)
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
# each stage attempt's and the chat's NetworkPolicy
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, list, watch]
# the chat's PodDisruptionBudget (replicas > 1)
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create]
{{- end }}

{{/* kopf discovers the custom resource through the CRD list (cluster-scoped in every mode). */}}
{{- define "kuberlhf.crdDiscoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
{{- end }}

{{- define "kuberlhf.seaweedfs.fullname" -}}
{{- printf "%s-s3" (include "kuberlhf.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kuberlhf.seaweedfs.secretName" -}}
{{- default (printf "%s-credentials" (include "kuberlhf.seaweedfs.fullname" .)) .Values.seaweedfs.auth.existingSecret }}
{{- end }}

{{- define "kuberlhf.seaweedfs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberlhf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: s3
{{- end }}

{{- define "kuberlhf.seaweedfs.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end }}

{{/*
"true" when the in-cluster SeaweedFS runs with the public demo keys of examples/s3-secret.yaml: given inline, or
in the existing Secret (read with lookup, so only on a real install/upgrade).
*/}}
{{- define "kuberlhf.seaweedfs.demoKeys" -}}
{{- $demo := list "kuberlhf-demo" "kuberlhf-demo-secret-change-me" }}
{{- $auth := .Values.seaweedfs.auth }}
{{- if $auth.existingSecret }}
{{- with lookup "v1" "Secret" .Release.Namespace $auth.existingSecret }}
{{- $data := .data | default dict }}
{{- if or (has (get $data "AWS_ACCESS_KEY_ID" | b64dec) $demo) (has (get $data "AWS_SECRET_ACCESS_KEY" | b64dec) $demo) }}true{{ end }}
{{- end }}
{{- else if or (has $auth.accessKey $demo) (has $auth.secretKey $demo) }}true
{{- end }}
{{- end }}
