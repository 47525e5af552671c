{{/*
Names and labels shared by every template (the conventional helper names).
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "mailbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the operator's resources: fullnameOverride, else the release
name when it contains the chart's name, else <release>-<name>. 63 characters
at most (DNS label).
*/}}
{{- define "mailbridge.fullname" -}}
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

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "mailbridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object the chart installs.
*/}}
{{- define "mailbridge.commonLabels" -}}
helm.sh/chart: {{ include "mailbridge.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mailbridge
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the operator's objects (Deployment, pod, ServiceAccount, RBAC, Service).
*/}}
{{- define "mailbridge.labels" -}}
{{ include "mailbridge.commonLabels" . }}
app.kubernetes.io/name: {{ include "mailbridge.name" . }}-operator
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of the monitoring objects (PrometheusRule, dashboard ConfigMaps).
*/}}
{{- define "mailbridge.monitoringLabels" -}}
{{ include "mailbridge.commonLabels" . }}
app.kubernetes.io/name: {{ include "mailbridge.name" . }}
app.kubernetes.io/component: monitoring
{{- end }}

{{/*
Selector labels of the operator's pod. The name is "<name>-operator", never
"<name>": a bridge's Services select its pods by app.kubernetes.io/name=mailbridge
and app.kubernetes.io/instance=<MailBridge name>, so a MailBridge named like the
release must never select the operator's pod.
*/}}
{{- define "mailbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailbridge.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "mailbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailbridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the cluster-scoped RBAC objects: they are shared by the whole cluster,
so the release namespace is part of it (two releases of one name in two
namespaces, each watching its own namespaces, do not collide).
*/}}
{{- define "mailbridge.clusterRoleName" -}}
{{- printf "%s-%s" .Release.Namespace (include "mailbridge.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/* The image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "mailbridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The operator's liveness URL inside the cluster (used by `helm test`). */}}
{{- define "mailbridge.healthURL" -}}
{{- printf "http://%s.%s.svc:%d/healthz" (include "mailbridge.fullname" .) .Release.Namespace (int .Values.operator.healthPort) }}
{{- end }}
