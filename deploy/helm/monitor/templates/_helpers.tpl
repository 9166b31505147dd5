{{- define "monitor.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "monitor.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "monitor.labels" -}}
app.kubernetes.io/name: {{ include "monitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "monitor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "monitor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "monitor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "monitor.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* agent.toml from .Values.config: strings quoted, lists as TOML arrays. */}}
{{- define "monitor.agentToml" -}}
{{- range $key, $value := .Values.config }}
{{- if and (eq $key "key-file") $.Values.fleet.keySecret }}
{{- else if kindIs "slice" $value }}
{{ $key }} = [{{ range $i, $v := $value }}{{ if $i }}, {{ end }}{{ $v | toString | quote }}{{ end }}]
{{- else }}
{{ $key }} = {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- with .Values.fleet }}
{{- if .target }}
fleet = {{ .target | quote }}
fleet-stale-after = {{ .staleAfter | toString | quote }}
{{- end }}
{{- if .keySecret }}
key-file = "/etc/monitor-fleet/key"
{{- end }}
{{- end }}
{{- end -}}
