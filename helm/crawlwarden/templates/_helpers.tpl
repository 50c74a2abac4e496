{{/* Names -------------------------------------------------------------------------------- */}}

{{- define "crawlwarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crawlwarden.fullname" -}}
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

{{- define "crawlwarden.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crawlwarden.labels" -}}
app.kubernetes.io/name: {{ include "crawlwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "crawlwarden.versionLabels" . }}
{{- end -}}

{{/* The labels of every object besides name and instance (pods add them via their selector). */}}
{{- define "crawlwarden.versionLabels" -}}
helm.sh/chart: {{ include "crawlwarden.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector of the gateway pods. */}}
{{- define "crawlwarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crawlwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "crawlwarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "crawlwarden.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "crawlwarden.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Replicas and shared state --------------------------------------------------------------- */}}

{{/* The most replicas that may run at once, as a number: 1 means a single gateway. */}}
{{- define "crawlwarden.maxReplicas" -}}
{{- if .Values.autoscaling.enabled -}}
{{- max (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) -}}
{{- else -}}
{{- int .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{/* The fewest replicas that run: the PodDisruptionBudget needs more than one. */}}
{{- define "crawlwarden.minReplicas" -}}
{{- if .Values.autoscaling.enabled -}}
{{- int .Values.autoscaling.minReplicas -}}
{{- else -}}
{{- int .Values.replicaCount -}}
{{- end -}}
{{- end -}}

{{- define "crawlwarden.hasRedis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.redis.internal.enabled -}}true{{- end -}}
{{- end -}}

{{- define "crawlwarden.hasAuditDSN" -}}
{{- if or .Values.audit.dsn .Values.audit.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "crawlwarden.hasSigningKey" -}}
{{- if or .Values.signingKey.privateKey .Values.signingKey.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "crawlwarden.signingKeyPath" -}}
{{- printf "%s/audit.key" (trimSuffix "/" .Values.signingKey.mountPath) -}}
{{- end -}}

{{/* The Secret with the connection strings the chart was given inline. */}}
{{- define "crawlwarden.connectionsSecret" -}}
{{- printf "%s-connections" (include "crawlwarden.fullname" .) -}}
{{- end -}}

{{- define "crawlwarden.redisServiceName" -}}
{{- printf "%s-redis" (include "crawlwarden.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* How long the gateway waits, after the drain, for the fetch log's store to take the records
still queued before it exits (proxy/audit/log.py, FetchLog.close; not configurable). With the
store reachable that is well under a second; with PostgreSQL unreachable it is all of it, and
what is still queued then stays in the spool. tests/test_helm_chart.py checks it against the code. */}}
{{- define "crawlwarden.flushSeconds" -}}30{{- end -}}
{{/* The rest of a stop after the flush wait, at most: held requests' answers (1 s), the
WebSockets closed and recorded (1 s), the budget store's close with Redis silent (2 s), the fetch
log's store cut when PostgreSQL does not answer (up to 5 s), with room to spare. */}}
{{- define "crawlwarden.stopRestSeconds" -}}10{{- end -}}

{{/* The MITM CA -------------------------------------------------------------------------------- */}}

{{- define "crawlwarden.mitmCASecret" -}}
{{- if .Values.mitmCA.existingSecret -}}
{{- .Values.mitmCA.existingSecret -}}
{{- else -}}
{{- printf "%s-mitm-ca" (include "crawlwarden.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "crawlwarden.hasMitmCA" -}}
{{- if or .Values.mitmCA.existingSecret (and .Values.mitmCA.certificate .Values.mitmCA.privateKey) .Values.mitmCA.generate -}}true{{- end -}}
{{- end -}}

{{/*
The CA the chart stores itself (inline or generated), as a dict {cert, key}, or empty when the CA
comes from an existing Secret or there is none. Generated once per render and kept in .Values so
that the Secret and the published ConfigMaps carry the same certificate; reused from the live
Secret on upgrades.
*/}}
{{- define "crawlwarden.chartCA" -}}
{{- if and (not .Values.mitmCA.existingSecret) (not (hasKey .Values "__crawlwardenCA")) -}}
{{- if and .Values.mitmCA.certificate .Values.mitmCA.privateKey -}}
{{- $_ := set .Values "__crawlwardenCA" (dict "cert" .Values.mitmCA.certificate "key" .Values.mitmCA.privateKey) -}}
{{- else if .Values.mitmCA.generate -}}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "crawlwarden.mitmCASecret" .) -}}
{{- if and $live $live.data (index $live.data "tls.crt") (index $live.data "tls.key") -}}
{{- $_ := set .Values "__crawlwardenCA" (dict "cert" (index $live.data "tls.crt" | b64dec) "key" (index $live.data "tls.key" | b64dec)) -}}
{{- else -}}
{{- $ca := genCA .Values.mitmCA.generatedCommonName (int .Values.mitmCA.generatedValidityDays) -}}
{{- $_ := set .Values "__crawlwardenCA" (dict "cert" $ca.Cert "key" $ca.Key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if hasKey .Values "__crawlwardenCA" -}}
{{- toJson (index .Values "__crawlwardenCA") -}}
{{- end -}}
{{- end -}}

{{/* The policy -------------------------------------------------------------------------------- */}}

{{/* The inline policy as text. */}}
{{- define "crawlwarden.policyText" -}}
{{- .Values.policy | default "" -}}
{{- end -}}

{{- define "crawlwarden.policyConfigMap" -}}
{{- if .Values.existingPolicyConfigMap -}}
{{- .Values.existingPolicyConfigMap -}}
{{- else -}}
{{- printf "%s-policy" (include "crawlwarden.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Checks ------------------------------------------------------------------------------------
Values that would deploy a gateway that cannot start, or that breaks a promise of the design
(budgets shared by every replica, one CA, one fetch log), fail the render with what to change.
*/}}
{{- define "crawlwarden.validate" -}}
{{- $replicas := int (include "crawlwarden.maxReplicas" .) -}}
{{- $sources := 0 -}}
{{- range (list .Values.redis.url .Values.redis.existingSecret .Values.redis.internal.enabled) -}}
{{- if . -}}{{- $sources = add1 $sources -}}{{- end -}}
{{- end -}}
{{- if gt $sources 1 -}}
{{- fail "redis: give one of redis.url, redis.existingSecret or redis.internal.enabled" -}}
{{- end -}}
{{- if and .Values.audit.dsn .Values.audit.existingSecret -}}
{{- fail "audit: give one of audit.dsn or audit.existingSecret" -}}
{{- end -}}
{{- if and (gt $replicas 1) (not (include "crawlwarden.hasRedis" .)) -}}
{{- fail (printf "%d replicas without Redis would each keep their own budgets, so a site could get %d times its budget: set redis.url, redis.existingSecret or redis.internal.enabled" $replicas $replicas) -}}
{{- end -}}
{{- if and (gt $replicas 1) (not (include "crawlwarden.hasAuditDSN" .)) -}}
{{- fail "more than one replica needs one shared fetch log: set audit.dsn or audit.existingSecret (PostgreSQL)" -}}
{{- end -}}
{{- if and (gt $replicas 1) (not (include "crawlwarden.hasMitmCA" .)) -}}
{{- fail "more than one replica must present one CA to the scrapers: set mitmCA.existingSecret, mitmCA.certificate and mitmCA.privateKey, or mitmCA.generate" -}}
{{- end -}}
{{- if and (or .Values.mitmCA.certificate .Values.mitmCA.privateKey) (not (and .Values.mitmCA.certificate .Values.mitmCA.privateKey)) -}}
{{- fail "mitmCA: give both mitmCA.certificate and mitmCA.privateKey" -}}
{{- end -}}
{{- if and .Values.signingKey.privateKey .Values.signingKey.existingSecret -}}
{{- fail "signingKey: give one of signingKey.privateKey or signingKey.existingSecret" -}}
{{- end -}}
{{- if and (include "crawlwarden.hasAuditDSN" .) (not (include "crawlwarden.hasSigningKey" .)) -}}
{{- fail "a PostgreSQL fetch log needs one checkpoint signing key for every replica: set signingKey.existingSecret or signingKey.privateKey (crawlwarden keys generate)" -}}
{{- end -}}
{{- $drain := int .Values.drainSeconds -}}
{{- range .Values.extraEnv -}}
{{- if eq .name "CRAWLWARDEN_DRAIN_SECONDS" -}}
{{- fail "extraEnv: set the drain with drainSeconds (the chart checks it against terminationGracePeriodSeconds), not CRAWLWARDEN_DRAIN_SECONDS" -}}
{{- end -}}
{{- end -}}
{{- $flush := int (include "crawlwarden.flushSeconds" .) -}}
{{- $rest := int (include "crawlwarden.stopRestSeconds" .) -}}
{{- $stop := add (int .Values.preStopSleepSeconds) $drain $flush $rest -}}
{{- if lt (int .Values.terminationGracePeriodSeconds) $stop -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds (%d) + drainSeconds (%d) + the fetch log's flush wait (%d) + the rest of the stop (%d) = %d, or the kubelet kills the gateway before the fetch log is flushed (with PostgreSQL unreachable the flush waits all of it)" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds) $drain $flush $rest $stop) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not (or .Values.networkPolicy.scraperNamespaces.names .Values.networkPolicy.scraperNamespaces.matchLabels (and .Values.egressLockdown.enabled .Values.egressLockdown.namespaces))) -}}
{{- fail "networkPolicy.enabled: name the scraper namespaces (networkPolicy.scraperNamespaces.names or .matchLabels), or no scraper can reach the gateway" -}}
{{- end -}}
{{- if and .Values.egressLockdown.enabled (not .Values.egressLockdown.namespaces) -}}
{{- fail "egressLockdown.enabled: list the scraper namespaces in egressLockdown.namespaces" -}}
{{- end -}}
{{- if and .Values.egressLockdown.enabled (has .Release.Namespace .Values.egressLockdown.namespaces) (not .Values.egressLockdown.podSelector) -}}
{{- fail (printf "egressLockdown.namespaces includes %s, the gateway's own namespace: its pods would lose their way to the web; deploy the gateway in a namespace of its own or set egressLockdown.podSelector" .Release.Namespace) -}}
{{- end -}}
{{- if and .Values.mitmCA.publish.namespaces (not (include "crawlwarden.chartCA" .)) -}}
{{- fail "mitmCA.publish: the chart knows the CA certificate only when it is inline or generated; with mitmCA.existingSecret, copy its certificate into the scraper namespaces yourself (docs/kubernetes.md)" -}}
{{- end -}}
{{- $tokenEnv := .Values.metrics.serviceMonitor.tokenEnv -}}
{{- if and $tokenEnv (not .Values.adminTokens.existingSecret) (not (hasKey .Values.adminTokens.tokens $tokenEnv)) -}}
{{- fail (printf "metrics.serviceMonitor.tokenEnv: %s is not in adminTokens.tokens (nor is there an adminTokens.existingSecret): the ServiceMonitor reads the token from the admin tokens' Secret" $tokenEnv) -}}
{{- end -}}
{{- if not .Values.existingPolicyConfigMap -}}
{{- include "crawlwarden.validatePolicy" . -}}
{{- end -}}
{{- end -}}

{{/* What the chart can check of an inline policy: it parses, its token_env names are given, and
its audit.signing_key_file is the mounted key. The gateway validates the rest at start. */}}
{{- define "crawlwarden.validatePolicy" -}}
{{- $text := include "crawlwarden.policyText" . -}}
{{- if not (trim $text) -}}
{{- fail "policy: give the policy inline (policy) or name a ConfigMap (existingPolicyConfigMap)" -}}
{{- end -}}
{{- $doc := fromYaml $text -}}
{{- if hasKey $doc "Error" -}}
{{- fail (printf "policy: not valid YAML: %s" (index $doc "Error")) -}}
{{- end -}}
{{- $given := concat (keys .Values.teamTokens.tokens) (keys .Values.adminTokens.tokens) -}}
{{- range .Values.extraEnv -}}{{- $given = append $given .name -}}{{- end -}}
{{- $unknowable := or .Values.teamTokens.existingSecret .Values.adminTokens.existingSecret .Values.extraEnvFrom -}}
{{- if not $unknowable -}}
{{- $missing := list -}}
{{- range $section := list "teams" "admin_tokens" -}}
{{- range (index $doc $section | default list) -}}
{{- if and (kindIs "map" .) .token_env (not (has .token_env $given)) -}}
{{- $missing = append $missing .token_env -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "the policy reads tokens from %s, which nothing sets: give them in teamTokens.tokens / adminTokens.tokens or an existingSecret" (join ", " $missing)) -}}
{{- end -}}
{{- end -}}
{{- $metricsTokens := list -}}
{{- range (index $doc "admin_tokens" | default list) -}}
{{- if and (kindIs "map" .) (eq (toString .role) "metrics") -}}
{{- $metricsTokens = append $metricsTokens (.token_env | default "") -}}
{{- end -}}
{{- end -}}
{{- if and $metricsTokens .Values.metrics.serviceMonitor.enabled (not .Values.metrics.serviceMonitor.tokenEnv) -}}
{{- fail "the policy has a token of role metrics, so /metrics needs one: set metrics.serviceMonitor.tokenEnv to its token_env (in adminTokens), or Prometheus gets 401" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.tokenEnv (not (has .Values.metrics.serviceMonitor.tokenEnv $metricsTokens)) -}}
{{- fail (printf "metrics.serviceMonitor.tokenEnv: no admin_tokens entry of the policy has role metrics and token_env %s" .Values.metrics.serviceMonitor.tokenEnv) -}}
{{- end -}}
{{- $keyFile := "" -}}
{{- if kindIs "map" (index $doc "audit") -}}
{{- $keyFile = index $doc "audit" "signing_key_file" | default "" -}}
{{- end -}}
{{- if and (include "crawlwarden.hasSigningKey" .) (ne $keyFile (include "crawlwarden.signingKeyPath" .)) -}}
{{- fail (printf "the signing key is mounted at %s: set audit.signing_key_file: %s in the policy" (include "crawlwarden.signingKeyPath" .) (include "crawlwarden.signingKeyPath" .)) -}}
{{- end -}}
{{- if and $keyFile (not (include "crawlwarden.hasSigningKey" .)) (hasPrefix (trimSuffix "/" .Values.signingKey.mountPath) $keyFile) -}}
{{- fail (printf "the policy signs with %s, which only the chart's signing key would provide: set signingKey.existingSecret or signingKey.privateKey" $keyFile) -}}
{{- end -}}
{{- end -}}

{{- define "crawlwarden.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "crawlwarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}
