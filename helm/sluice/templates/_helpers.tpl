{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "ingest"). */}}
{{- define "sluice.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ .Values.serviceAccount.name | default (include "sluice.fullname" .) }}
{{- else -}}
{{ .Values.serviceAccount.name | default "default" }}
{{- end -}}
{{- end -}}

{{- define "sluice.credentialsSecret" -}}
{{- if .Values.credentials.existingSecret -}}
{{ .Values.credentials.existingSecret }}
{{- else if .Values.credentials.env -}}
{{ include "sluice.fullname" . }}-credentials
{{- end -}}
{{- end -}}

{{/*
TOML shared by every service. Numbers go through int so that they render as integers (values
arrive as floats).
*/}}
{{- define "sluice.sharedToml" -}}
[schemas]
directory = "/opt/sluice/schemas"

[kafka]
bootstrap_servers = {{ .Values.kafka.bootstrapServers | quote }}
topic_prefix = {{ .Values.kafka.topicPrefix | quote }}

[kafka.client]
{{- range $key, $value := .Values.kafka.client }}
{{ $key | quote }} = {{ $value | toString | quote }}
{{- end }}

[kafka.topics]
create_missing = {{ .Values.kafka.topics.createMissing }}
partitions = {{ .Values.kafka.topics.partitions | int }}
replication_factor = {{ .Values.kafka.topics.replicationFactor | int }}

[telemetry]
log_format = {{ .Values.telemetry.logFormat | quote }}
log_level = {{ .Values.telemetry.logLevel | quote }}
otlp_endpoint = {{ .Values.telemetry.otlpEndpoint | quote }}
{{- end -}}

{{- define "sluice.objectStoreToml" -}}
[object_store]
url = {{ .Values.objectStore.url | quote }}

[object_store.options]
{{- range $key, $value := .Values.objectStore.options }}
{{ $key }} = {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* [encryption] for the compactor and the executors, when columns are encrypted. */}}
{{- define "sluice.encryptionToml" -}}
{{- with .Values.encryption }}
{{- if .columns }}
{{- if not .keySecret.secretName }}
{{- fail "encryption.columns needs encryption.keySecret.secretName: the Secret with the master keys" }}
{{- end }}
{{- if not .footerKey }}
{{- fail "encryption.columns needs encryption.footerKey: the master key that signs each file's footer" }}
{{- end }}

[encryption]
key_file = "/etc/sluice-keys/{{ .keySecret.key }}"
footer_key = {{ .footerKey | quote }}
decrypting_jobs = [{{ range $index, $job := .decryptingJobs }}{{ if $index }}, {{ end }}{{ $job | quote }}{{ end }}]
{{- range .columns }}

[[encryption.columns]]
stream = {{ .stream | quote }}
column = {{ .column | quote }}
key = {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Extra keys from <service>.config, as TOML tables of strings, booleans and whole numbers. */}}
{{- define "sluice.extraToml" -}}
{{- range $section, $keys := . }}

[{{ $section }}]
{{- include "sluice.tomlKeys" $keys }}
{{- end }}
{{- end -}}

{{/* The keys of one table: strings, booleans and whole numbers. */}}
{{- define "sluice.tomlKeys" -}}
{{- range $key, $value := . }}
{{- if kindIs "float64" $value }}
{{ $key }} = {{ $value | int64 }}
{{- else if kindIs "bool" $value }}
{{ $key }} = {{ $value }}
{{- else }}
{{ $key }} = {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment every container gets: credentials, and the pod name as instance id. */}}
{{- define "sluice.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{- define "sluice.envFrom" -}}
{{- with (include "sluice.credentialsSecret" .) }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}
