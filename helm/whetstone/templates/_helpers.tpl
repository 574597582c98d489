{{/* The operator's ServiceAccount, ClusterRole and ClusterRoleBinding name. */}}
{{- define "whetstone.operatorName" -}}
{{- default (printf "%s-operator" .Release.Name) .Values.operatorName | trunc 63 | trimSuffix "-" -}}
{{- end -}}
