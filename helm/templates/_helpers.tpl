{{/* Chart name, truncated to the 63 characters Kubernetes allows in a name. */}}
{{- define "dp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name. */}}
{{- define "dp.fullname" -}}
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

{{/* Name of one service's objects: dict "root" $ "svc" name. */}}
{{- define "dp.svcname" -}}
{{- printf "%s-%s" (include "dp.fullname" .root) .svc | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "dp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "dp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: data-processing
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one service: dict "root" $ "svc" name. */}}
{{- define "dp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .svc }}
{{- end -}}

{{- define "dp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dp.secretName" -}}
{{- default (printf "%s-secrets" (include "dp.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "dp.configName" -}}
{{- printf "%s-config" (include "dp.fullname" .) -}}
{{- end -}}

{{/* Image reference: dict "root" $ "image" the image values. */}}
{{- define "dp.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- printf "%s%s:%s" .root.Values.global.imageRegistry .image.repository $tag -}}
{{- end -}}

{{/* Pod-level security context of the "restricted" Pod Security Standard. */}}
{{- define "dp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context of the "restricted" Pod Security Standard. */}}
{{- define "dp.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* PostgreSQL DSN built from the infrastructure values (password URL-encoded). */}}
{{- define "dp.postgresDsn" -}}
{{- $pg := .Values.infrastructure.postgresql -}}
{{- if $pg.password -}}
{{- printf "postgresql://%s:%s@%s:%v/%s" (urlquery $pg.username) (urlquery $pg.password) $pg.host $pg.port $pg.database -}}
{{- else -}}
{{- printf "postgresql://%s@%s:%v/%s" (urlquery $pg.username) $pg.host $pg.port $pg.database -}}
{{- end -}}
{{- end -}}

{{/* Redis URL with the password and database number. */}}
{{- define "dp.redisUrl" -}}
{{- $r := .Values.infrastructure.redis -}}
{{- $u := urlParse $r.url -}}
{{- $auth := "" -}}
{{- if $r.password -}}{{- $auth = printf ":%s@" (urlquery $r.password) -}}{{- end -}}
{{- printf "%s://%s%s/%v" $u.scheme $auth $u.host $r.database -}}
{{- end -}}

{{/* Checks the values cannot break the contract: equal chain partitions, replicas <= partitions. */}}
{{- define "dp.validate" -}}
{{- $chain := list "ingestion.market.raw.v1" "normalized.market.ticks.v1" "enriched.market.ticks.v1" "aggregated.market.bars.v1" -}}
{{- $counts := dict -}}
{{- range .Values.infrastructure.kafka.topics -}}
{{- if has .name $chain -}}{{- $_ := set $counts .name (int .partitions) -}}{{- end -}}
{{- end -}}
{{- range $chain -}}
{{- if not (hasKey $counts .) -}}{{- fail (printf "infrastructure.kafka.topics must list %s" .) -}}{{- end -}}
{{- end -}}
{{- $p := get $counts "ingestion.market.raw.v1" -}}
{{- range $name, $n := $counts -}}
{{- if ne $n $p -}}{{- fail (printf "every chain topic needs the same partition count: %s has %v, ingestion.market.raw.v1 has %v" $name $n $p) -}}{{- end -}}
{{- end -}}
{{- if and (has .Values.global.environment (list "staging" "prod")) (not .Values.secrets.existingSecret) -}}
{{- $i := .Values.infrastructure -}}
{{- if not (and $i.postgresql.password $i.redis.password $i.clickhouse.password) -}}
{{- fail (printf "%s needs passwords: set secrets.existingSecret or the infrastructure passwords" .Values.global.environment) -}}
{{- end -}}
{{- end -}}
{{- $side := list -}}
{{- $rf := list -}}
{{- range .Values.infrastructure.kafka.topics -}}
{{- $rf = append $rf (int .replicationFactor) -}}
{{- if not (has .name $chain) -}}{{- $side = append $side (int .partitions) -}}{{- end -}}
{{- end -}}
{{- if gt (len (uniq $side)) 1 -}}{{- fail "the dead-letter and audit topics need the same partition count" -}}{{- end -}}
{{- if gt (len (uniq $rf)) 1 -}}{{- fail "every topic needs the same replicationFactor" -}}{{- end -}}
{{- range $svc, $cfg := .Values.services -}}
{{- if $cfg.enabled -}}
{{- $max := int $cfg.replicaCount -}}
{{- if $cfg.autoscaling.enabled -}}{{- $max = int $cfg.autoscaling.maxReplicas -}}{{- end -}}
{{- if gt $max (int $p) -}}{{- fail (printf "services.%s may run %v replicas but the chain topics have only %v partitions" $svc $max $p) -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Topic settings for the ConfigMap, derived from infrastructure.kafka.topics. */}}
{{- define "dp.topicSettings" -}}
{{- $chain := list "ingestion.market.raw.v1" "normalized.market.ticks.v1" "enriched.market.ticks.v1" "aggregated.market.bars.v1" -}}
{{- $p := 0 -}}{{- $side := 0 -}}{{- $rf := 1 -}}
{{- range .Values.infrastructure.kafka.topics -}}
{{- $rf = int .replicationFactor -}}
{{- if has .name $chain -}}{{- $p = int .partitions -}}{{- else -}}{{- $side = int .partitions -}}{{- end -}}
{{- end -}}
DATA_PROC_TOPICS__PARTITIONS: {{ $p | quote }}
{{- if $side }}
DATA_PROC_TOPICS__SIDE_PARTITIONS: {{ $side | quote }}
{{- end }}
DATA_PROC_TOPICS__REPLICATION_FACTOR: {{ $rf | quote }}
DATA_PROC_TOPICS__MIN_INSYNC_REPLICAS: {{ min (int .Values.infrastructure.kafka.minInsyncReplicas) $rf | quote }}
{{- end -}}

{{/* envFrom, env and TLS mounts shared by the services and the Jobs: dict "root" $ "env" map. */}}
{{- define "dp.containerEnv" -}}
envFrom:
  - configMapRef:
      name: {{ include "dp.configName" .root }}
  - secretRef:
      name: {{ include "dp.secretName" .root }}
env:
  # Kafka client id and transactional id: <service>-<pod name>.
  - name: DATA_PROC_INSTANCE_ID
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  {{- range $k, $v := .env }}
  - name: {{ $k }}
    value: {{ $v | toString | quote }}
  {{- end }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if .root.Values.tls.caSecret }}
  - name: tls-ca
    mountPath: {{ .root.Values.tls.mountPath }}
    readOnly: true
  {{- end }}
{{- end -}}

{{/* Volumes behind dp.containerEnv's mounts. */}}
{{- define "dp.volumes" -}}
# The root filesystem is read-only; Python and librdkafka may write temporary files here.
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- if .Values.tls.caSecret }}
- name: tls-ca
  secret:
    secretName: {{ .Values.tls.caSecret }}
{{- end }}
{{- end -}}
