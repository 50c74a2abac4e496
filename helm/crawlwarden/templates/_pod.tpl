{{/*
The gateway pod, shared by the Deployment (persistence.enabled=false) and the StatefulSet
(persistence.enabled=true). Every setting of `crawlwarden run` comes from a CRAWLWARDEN_*
variable, except --policy, which is an argument.
*/}}

{{- define "crawlwarden.policyPath" -}}/etc/crawlwarden/policy.yaml{{- end -}}
{{- define "crawlwarden.mitmCADir" -}}/var/run/secrets/crawlwarden-mitm-ca{{- end -}}
{{- define "crawlwarden.upstreamCADir" -}}/etc/crawlwarden-upstream-ca{{- end -}}

{{/*
Writes the shared CA where mitmproxy looks for it: DATA_DIR/mitmproxy-ca.pem (key, then
certificate) and DATA_DIR/mitmproxy-ca-cert.pem (the certificate scrapers trust). Copied rather
than mounted because the data dir must stay writable for the spool. Files of an earlier, self-made
CA on a persistent volume are removed so that nothing presents it again.
*/}}
{{- define "crawlwarden.initCAScript" -}}
set -eu
d="$CRAWLWARDEN_DATA_DIR"
rm -f "$d/mitmproxy-ca.p12" "$d/mitmproxy-ca-cert.p12" "$d/mitmproxy-ca-cert.cer"
umask 077
cat "$MITM_CA_DIR/tls.key" "$MITM_CA_DIR/tls.crt" > "$d/mitmproxy-ca.pem.tmp"
mv "$d/mitmproxy-ca.pem.tmp" "$d/mitmproxy-ca.pem"
umask 022
cp "$MITM_CA_DIR/tls.crt" "$d/mitmproxy-ca-cert.pem.tmp"
mv "$d/mitmproxy-ca-cert.pem.tmp" "$d/mitmproxy-ca-cert.pem"
echo "crawlwarden: CA $MITM_CA_DIR written to $d"
{{- end -}}

{{- define "crawlwarden.checksums" -}}
{{- if not .Values.existingPolicyConfigMap }}
checksum/policy: {{ include "crawlwarden.policyText" . | sha256sum }}
{{- end }}
{{- $secrets := dict
  "team" .Values.teamTokens.tokens
  "admin" .Values.adminTokens.tokens
  "redis" .Values.redis.url
  "audit" .Values.audit.dsn
  "key" .Values.signingKey.privateKey
  "ca" (include "crawlwarden.chartCA" .)
  "refs" (list .Values.teamTokens.existingSecret .Values.adminTokens.existingSecret .Values.redis.existingSecret .Values.audit.existingSecret .Values.signingKey.existingSecret .Values.mitmCA.existingSecret) }}
checksum/secrets: {{ toJson $secrets | sha256sum }}
{{- end -}}

{{- define "crawlwarden.podTemplate" -}}
metadata:
  labels:
    {{- include "crawlwarden.selectorLabels" . | nindent 4 }}
    {{- include "crawlwarden.versionLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- include "crawlwarden.checksums" . | trim | nindent 4 }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "crawlwarden.serviceAccountName" . }}
  # The gateway never talks to the Kubernetes API.
  automountServiceAccountToken: false
  # Service links would put CRAWLWARDEN_* variables (e.g. CRAWLWARDEN_PORT for a Service named
  # crawlwarden) into the environment, where `crawlwarden run` reads its flags.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- if include "crawlwarden.hasMitmCA" . }}
  initContainers:
    - name: mitm-ca
      image: {{ include "crawlwarden.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["sh", "-c"]
      args:
        - |
          {{- include "crawlwarden.initCAScript" . | nindent 10 }}
      env:
        - name: CRAWLWARDEN_DATA_DIR
          value: {{ .Values.dataDir | quote }}
        - name: MITM_CA_DIR
          value: {{ include "crawlwarden.mitmCADir" . | quote }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {memory: 64Mi}
      volumeMounts:
        - name: data
          mountPath: {{ .Values.dataDir }}
        - name: mitm-ca
          mountPath: {{ include "crawlwarden.mitmCADir" . }}
          readOnly: true
  {{- end }}
  containers:
    - name: gateway
      image: {{ include "crawlwarden.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["crawlwarden"]
      args: ["run", "--policy", {{ include "crawlwarden.policyPath" . | quote }}]
      ports:
        - name: proxy
          containerPort: {{ int .Values.containerPorts.proxy }}
          protocol: TCP
        - name: admin
          containerPort: {{ int .Values.containerPorts.admin }}
          protocol: TCP
      env:
        - name: CRAWLWARDEN_LISTEN
          value: {{ printf "%s:%d" (include "crawlwarden.hostForListen" .Values.listenHost) (int .Values.containerPorts.proxy) | quote }}
        - name: CRAWLWARDEN_ADMIN
          value: {{ printf "%s:%d" (include "crawlwarden.hostForListen" .Values.listenHost) (int .Values.containerPorts.admin) | quote }}
        - name: CRAWLWARDEN_DATA_DIR
          value: {{ .Values.dataDir | quote }}
        - name: CRAWLWARDEN_LOG_LEVEL
          value: {{ .Values.logLevel | quote }}
        - name: CRAWLWARDEN_DRAIN_SECONDS
          value: {{ int .Values.drainSeconds | quote }}
        # While Redis is down, each replica enforces 1/N of a `fail_mode: local` site's budgets:
        # N is never below the most replicas that may run (a pod that starts in the outage has
        # seen no other).
        - name: CRAWLWARDEN_FLEET_SIZE
          value: {{ include "crawlwarden.maxReplicas" . | quote }}
        # The pod's name is the replica's name in fetch records (its own hash chain).
        - name: CRAWLWARDEN_REPLICA_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- if .Values.redis.internal.enabled }}
        - name: CRAWLWARDEN_REDIS_URL
          value: {{ printf "redis://%s:6379/0" (include "crawlwarden.redisServiceName" .) | quote }}
        {{- else if or .Values.redis.url .Values.redis.existingSecret }}
        - name: CRAWLWARDEN_REDIS_URL
          valueFrom:
            secretKeyRef:
              name: {{ .Values.redis.existingSecret | default (include "crawlwarden.connectionsSecret" .) }}
              key: {{ ternary .Values.redis.existingSecretKey "redis-url" (not (empty .Values.redis.existingSecret)) }}
        {{- end }}
        {{- if include "crawlwarden.hasAuditDSN" . }}
        - name: CRAWLWARDEN_AUDIT_DSN
          valueFrom:
            secretKeyRef:
              name: {{ .Values.audit.existingSecret | default (include "crawlwarden.connectionsSecret" .) }}
              key: {{ ternary .Values.audit.existingSecretKey "audit-dsn" (not (empty .Values.audit.existingSecret)) }}
        {{- end }}
        {{- if .Values.upstreamTrustedCA.configMap }}
        - name: CRAWLWARDEN_UPSTREAM_TRUSTED_CA
          value: {{ printf "%s/ca.pem" (include "crawlwarden.upstreamCADir" .) | quote }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $envFrom := list }}
      {{- if or .Values.teamTokens.tokens .Values.teamTokens.existingSecret }}
      {{- $envFrom = append $envFrom (dict "secretRef" (dict "name" (.Values.teamTokens.existingSecret | default (printf "%s-team-tokens" (include "crawlwarden.fullname" .))))) }}
      {{- end }}
      {{- if or .Values.adminTokens.tokens .Values.adminTokens.existingSecret }}
      {{- $envFrom = append $envFrom (dict "secretRef" (dict "name" (.Values.adminTokens.existingSecret | default (printf "%s-admin-tokens" (include "crawlwarden.fullname" .))))) }}
      {{- end }}
      {{- $envFrom = concat $envFrom .Values.extraEnvFrom }}
      {{- with $envFrom }}
      # Token variables named by the policy's teams[].token_env and admin_tokens[].token_env.
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      startupProbe:
        httpGet: {path: /healthz, port: admin}
        {{- toYaml .Values.startupProbe | nindent 8 }}
      livenessProbe:
        httpGet: {path: /healthz, port: admin}
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      # 503 while draining or when the fetch log cannot take records: no new connections then.
      readinessProbe:
        httpGet: {path: /readyz, port: admin}
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      lifecycle:
        # Give the endpoints time to drop this pod before SIGTERM starts the drain.
        preStop:
          exec:
            command: ["sleep", {{ .Values.preStopSleepSeconds | int | toString | quote }}]
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      volumeMounts:
        - name: policy
          mountPath: /etc/crawlwarden
          readOnly: true
        - name: data
          mountPath: {{ .Values.dataDir }}
        - name: tmp
          mountPath: /tmp
        {{- if include "crawlwarden.hasSigningKey" . }}
        - name: signing-key
          mountPath: {{ .Values.signingKey.mountPath }}
          readOnly: true
        {{- end }}
        {{- if .Values.upstreamTrustedCA.configMap }}
        - name: upstream-ca
          mountPath: {{ include "crawlwarden.upstreamCADir" . }}
          readOnly: true
        {{- end }}
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: policy
      configMap:
        name: {{ include "crawlwarden.policyConfigMap" . }}
        items:
          - key: {{ ternary .Values.existingPolicyConfigMapKey "policy.yaml" (not (empty .Values.existingPolicyConfigMap)) }}
            path: policy.yaml
    {{- if not .Values.persistence.enabled }}
    - name: data
      emptyDir:
        {{- with .Values.persistence.emptyDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if include "crawlwarden.hasSigningKey" . }}
    - name: signing-key
      secret:
        secretName: {{ .Values.signingKey.existingSecret | default (printf "%s-signing-key" (include "crawlwarden.fullname" .)) }}
        # 0440: readable by the pod's fsGroup only, which the gateway runs as.
        defaultMode: 288
        items:
          - key: {{ ternary .Values.signingKey.existingSecretKey "audit.key" (not (empty .Values.signingKey.existingSecret)) }}
            path: audit.key
    {{- end }}
    {{- if include "crawlwarden.hasMitmCA" . }}
    - name: mitm-ca
      secret:
        secretName: {{ include "crawlwarden.mitmCASecret" . }}
        defaultMode: 288
        items:
          - key: {{ ternary .Values.mitmCA.certKey "tls.crt" (not (empty .Values.mitmCA.existingSecret)) }}
            path: tls.crt
          - key: {{ ternary .Values.mitmCA.keyKey "tls.key" (not (empty .Values.mitmCA.existingSecret)) }}
            path: tls.key
    {{- end }}
    {{- if .Values.upstreamTrustedCA.configMap }}
    - name: upstream-ca
      configMap:
        name: {{ .Values.upstreamTrustedCA.configMap }}
        items:
          - key: {{ .Values.upstreamTrustedCA.key }}
            path: ca.pem
    {{- end }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  topologySpreadConstraints:
    {{- if .Values.topologySpreadConstraints }}
    {{- toYaml .Values.topologySpreadConstraints | nindent 4 }}
    {{- else }}
    - maxSkew: 1
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "crawlwarden.selectorLabels" . | nindent 10 }}
    {{- end }}
{{- end -}}

{{/* An IPv6 listen host needs brackets in HOST:PORT. */}}
{{- define "crawlwarden.hostForListen" -}}
{{- if contains ":" . -}}[{{ . }}]{{- else -}}{{ . }}{{- end -}}
{{- end -}}
