//! The job the stand-in runs: its payload, variables and stage bodies, as gitlab-runner
//! v18.3.0-1857-gd79f3e7b8 writes them (the files named below are of that version).

use std::time::Duration;

use crate::demo::shell::BashWriter;

/// A job as GitLab hands it to the runner: its ids and token (the payload), variables and the
/// stage bodies to run.
#[derive(Debug, Clone, Default)]
pub struct Job {
    /// The job id (the payload's `id`).
    pub id: u64,
    /// The project id (the payload's `job_info.project_id`).
    pub project_id: u64,
    /// The job token (the payload's `token`, also `CI_JOB_TOKEN`).
    pub token: String,
    /// Job variables; each reaches the driver as `CUSTOM_ENV_<key>`. A job may override the
    /// predefined ones (push a forged `CI_JOB_ID` after them): the payload keeps the truth.
    pub variables: Vec<(String, String)>,
    /// `(stage name, bash body)` in execution order, as gitlab-runner would generate them;
    /// see [`Job::standard_stages`].
    pub stages: Vec<(String, String)>,
    /// The `after_script` body: run after the user steps, whether they passed or failed.
    pub after_script: Option<String>,
    /// The project's path (`job_info.project_full_path`, the repository's path).
    pub project_path: String,
    /// File-type variables `(key, content)`: each script writes the content under
    /// `<CI_PROJECT_DIR>.tmp/` and exports the variable as that file's path.
    pub files: Vec<(String, String)>,
    /// The job timeout (the payload's `runner_info.timeout`); zero means gitlab-runner's
    /// default of two hours (`DefaultTimeout` in `common/consts.go`, `Build.GetBuildTimeout`).
    pub timeout: Duration,
}

impl Job {
    /// Job `job_id` of project `project_id` running `script`, with the CI variables
    /// gitlab-runner sets, the standard stages and a token unique to the job.
    pub fn new(project_id: u64, job_id: u64, builds_dir: &str, script: &str) -> Job {
        Job::in_project(project_id, "group/project", job_id, builds_dir, script)
    }

    /// [`Job::new`] for the project at `project_path` (its repository's path): the project
    /// directory is `<builds_dir>/<project_path>` (`ProjectUniqueDir` in `common/build.go`).
    pub fn in_project(
        project_id: u64,
        project_path: &str,
        job_id: u64,
        builds_dir: &str,
        script: &str,
    ) -> Job {
        let token = format!("glcbt-64_job{job_id}tokenNEVERPRINTED");
        let mut variables = Job::ci_variables("7", &project_id.to_string(), &job_id.to_string(), builds_dir);
        for (k, v) in &mut variables {
            match k.as_str() {
                "CI_JOB_TOKEN" => v.clone_from(&token),
                "CI_PROJECT_PATH" => *v = project_path.to_string(),
                "CI_PROJECT_DIR" => *v = format!("{builds_dir}/{project_path}"),
                _ => {}
            }
        }
        Job {
            id: job_id,
            project_id,
            token,
            variables,
            stages: Job::standard_stages(&format!("{builds_dir}/{project_path}"), script),
            after_script: None,
            project_path: project_path.to_string(),
            files: Vec::new(),
            timeout: Duration::from_secs(3600),
        }
    }

    /// The job payload gitlab-runner writes to `JOB_RESPONSE_FILE`: its `common.JobResponse`
    /// (`common/network.go`, v18.3.0; `spec.Job` in `common/spec/spec.go` on main), JSON-encoded
    /// by `createJobResponseFile` in `executors/custom/custom.go`. The fields a driver may read.
    pub fn payload(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "token": self.token,
            "allow_git_fetch": true,
            "job_info": {
                "name": self.variables.iter().find(|(n, _)| n == "CI_JOB_NAME").map(|(_, v)| v.clone()).unwrap_or_default(),
                "stage": "test",
                "project_id": self.project_id,
                "project_name": "project",
                "project_full_path": self.project_path,
                // `CI_PIPELINE_ID` as [`Job::ci_variables`] sets it.
                "pipeline_id": format!("9{}", self.id).parse::<u64>().unwrap_or_default(),
            },
            "git_info": { "repo_url": format!("https://gitlab.example.com/{}.git", self.project_path), "ref": "main" },
            "runner_info": { "timeout": self.timeout.as_secs() },
            "variables": self.variables.iter().map(|(k, v)| serde_json::json!({
                "key": k, "value": v, "public": k != "CI_JOB_TOKEN", "masked": k == "CI_JOB_TOKEN",
                "file": false, "raw": false,
            })).chain(self.files.iter().map(|(k, v)| serde_json::json!({
                "key": k, "value": v, "public": false, "masked": false, "file": true, "raw": false,
            }))).collect::<Vec<_>>(),
        })
    }

    /// The CI variables gitlab-runner always sets, for a job with these ids.
    pub fn ci_variables(
        runner_id: &str,
        project_id: &str,
        job_id: &str,
        builds_dir: &str,
    ) -> Vec<(String, String)> {
        let project_dir = format!("{builds_dir}/group/project");
        [
            ("CI_RUNNER_ID", runner_id.to_string()),
            ("CI_RUNNER_SHORT_TOKEN", format!("t{runner_id}short")),
            ("CI_PROJECT_ID", project_id.to_string()),
            ("CI_PROJECT_PATH", "group/project".to_string()),
            ("CI_PROJECT_NAME", "project".to_string()),
            ("CI_JOB_ID", job_id.to_string()),
            ("CI_JOB_NAME", "build".to_string()),
            ("CI_PIPELINE_ID", format!("9{job_id}")),
            ("CI_CONCURRENT_ID", "0".to_string()),
            ("CI_CONCURRENT_PROJECT_ID", "0".to_string()),
            ("CI_BUILDS_DIR", builds_dir.to_string()),
            ("CI_PROJECT_DIR", project_dir),
            ("CI_SERVER", "yes".to_string()),
            ("CI_JOB_STATUS", "running".to_string()),
            ("CI_JOB_TIMEOUT", "3600".to_string()),
            ("CI_JOB_TOKEN", "glcbt-64_jobtokenNEVERPRINTED".to_string()),
            ("CI_SHARED_ENVIRONMENT", "true".to_string()),
            ("CI_JOB_SERVICES", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The stages gitlab-runner runs for a plain job with this `script` (one command; a
    /// multi-line one is announced by its first line). Each body is what follows the variable
    /// exports [`super::Attempt::start_stage`] writes: `get_sources` stands in for the git commands
    /// with a `mkdir`, the user step `cd`s to the project and echoes `$ command` first
    /// (`writeUserScript`, `writeCommands` in `shells/abstract.go`).
    pub fn standard_stages(project_dir: &str, script: &str) -> Vec<(String, String)> {
        let mut sources = BashWriter::new(project_dir);
        sources.notice("Fetching changes...");
        sources.command(&["mkdir", "-p", project_dir]);
        sources.cd(project_dir);
        vec![
            ("prepare_script".into(), String::new()),
            ("get_sources".into(), sources.body().to_string()),
            ("build_script".into(), Job::user_step(project_dir, &[script.to_string()])),
            ("cleanup_file_variables".into(), String::new()),
        ]
    }

    /// A user step's body: `cd` to the project, then each command after its `$ command` line.
    pub fn user_step(project_dir: &str, commands: &[String]) -> String {
        let mut w = BashWriter::new(project_dir);
        w.cd(project_dir);
        w.commands(commands);
        w.body().to_string()
    }

    /// Adds gitlab-runner's cache and artifact stages for `paths`: `restore_cache` after
    /// `get_sources`, `archive_cache` and `upload_artifacts_on_success` before
    /// `cleanup_file_variables`, each helper call guarded by `gitlab-runner --version`
    /// (`cacheExtractor`, `addExtractCacheCommand`, `addCacheUploadCommand`,
    /// `writeUploadArtifact` and `guardRunnerCommand` in `shells/abstract.go`).
    pub fn with_cache_and_artifacts(mut self, paths: &[&str]) -> Job {
        let project_dir = self
            .variables
            .iter()
            .rev()
            .find(|(k, _)| k == "CI_PROJECT_DIR")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let archive = "../../../cache/group/project/default-protected/cache.zip";
        let path_args: Vec<&str> = paths.iter().flat_map(|p| ["--path", p]).collect();
        let mut restore = BashWriter::new(&project_dir);
        restore.cd(&project_dir);
        restore.guard_runner_command("gitlab-runner", "Extracting cache", |w| {
            w.notice("Checking cache for default-protected...");
            let args = ["gitlab-runner", "cache-extractor", "--file", archive, "--timeout", "10"];
            w.if_cmd_with_output(&args, "Successfully extracted cache", "Failed to extract cache");
        });
        let mut archive_w = BashWriter::new(&project_dir);
        archive_w.cd(&project_dir);
        archive_w.guard_runner_command("gitlab-runner", "Creating cache", |w| {
            w.notice("Creating cache default-protected...");
            let mut args = vec!["gitlab-runner", "cache-archiver", "--file", archive];
            args.extend(["--alternate-file", archive, "--timeout", "10"]);
            args.extend(&path_args);
            w.if_cmd_with_output(&args, "Created cache", "Failed to create cache");
        });
        let id = self.id.to_string();
        let mut upload = BashWriter::new(&project_dir);
        upload.cd(&project_dir);
        upload.guard_runner_command("gitlab-runner", "Uploading artifacts", |w| {
            w.notice("Uploading artifacts...");
            let mut args =
                vec!["gitlab-runner", "artifacts-uploader", "--url", "https://gitlab.example.com/"];
            args.extend(["--token", &self.token, "--id", &id, "--timeout", "1h0m0s"]);
            args.extend(["--response-header-timeout", "10m0s"]);
            args.extend(&path_args);
            w.command(&args);
        });
        let at = self.stages.iter().position(|(s, _)| s == "get_sources").map_or(0, |i| i + 1);
        self.stages.insert(at, ("restore_cache".into(), restore.body().to_string()));
        let at =
            self.stages.iter().position(|(s, _)| s == "cleanup_file_variables").unwrap_or(self.stages.len());
        self.stages.insert(at, ("upload_artifacts_on_success".into(), upload.body().to_string()));
        self.stages.insert(at, ("archive_cache".into(), archive_w.body().to_string()));
        self
    }

    /// Makes the cache and artifacts `when: always`: the `_on_failure` stages get the same
    /// calls as the `_on_success` ones (`CacheWhen.ShouldCache`, `ArtifactWhen.OnFailure` in
    /// `common/spec`).
    pub fn when_always(mut self) -> Job {
        for (from, to) in [
            ("archive_cache", "archive_cache_on_failure"),
            ("upload_artifacts_on_success", "upload_artifacts_on_failure"),
        ] {
            if let Some(at) = self.stages.iter().position(|(s, _)| s == from) {
                let body = self.stages[at].1.clone();
                self.stages.insert(at + 1, (to.to_string(), body));
            }
        }
        self
    }

    /// A job shaped like one GitLab sends: `commands` as the script, about a hundred predefined
    /// variables (the names of GitLab's predefined CI/CD variables), a commit message and a
    /// certificate bundle as a file variable, so that every stage script is over 100 KB, as a
    /// real runner's are.
    pub fn realistic(project_id: u64, job_id: u64, builds_dir: &str, commands: &[&str]) -> Job {
        let mut job = Job::new(project_id, job_id, builds_dir, "true");
        let project_dir = format!("{builds_dir}/group/project");
        let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        for (_, body) in job.stages.iter_mut().filter(|(s, _)| s == "build_script") {
            *body = Job::user_step(&project_dir, &commands);
        }
        let sha = format!("{:040x}", u128::from(job_id) * 0x9e37_79b9_7f4a_7c15);
        let message = "Refactor the scheduler (#1234)\n\n".to_string()
            + &"Long commit bodies with non-ASCII text — naïve café, 中文说明, ✓ — are common.\n".repeat(200);
        for name in PREDEFINED {
            let value = match *name {
                "CI_COMMIT_SHA" | "CI_COMMIT_BEFORE_SHA" => sha.clone(),
                "CI_COMMIT_SHORT_SHA" => sha[..8].to_string(),
                "CI_COMMIT_MESSAGE" | "CI_COMMIT_DESCRIPTION" => message.clone(),
                "CI_COMMIT_TITLE" => "Refactor the scheduler (#1234)".to_string(),
                n if n.ends_with("_URL") => {
                    format!("https://gitlab.example.com/group/project/-/{}", n.to_lowercase())
                }
                n => format!("{}-value", n.to_lowercase()),
            };
            if !job.variables.iter().any(|(k, _)| k == name) {
                job.variables.push((name.to_string(), value));
            }
        }
        let cert = "-----BEGIN CERTIFICATE-----\n".to_string()
            + &"MIIFazCCA1OgAwIBAgIRAIIQz7DSQONZRGPgu2OCiwAwDQYJKoZIhvcNAQELBQAw\n".repeat(40)
            + "-----END CERTIFICATE-----\n";
        job.files.push(("CI_SERVER_TLS_CA_FILE".to_string(), cert.repeat(20)));
        job
    }
}

/// Names of GitLab's predefined CI/CD variables (GitLab's "Predefined CI/CD variables
/// reference") that [`Job::realistic`] adds to the ones [`Job::ci_variables`] sets.
const PREDEFINED: &[&str] = &[
    "CHAT_CHANNEL",
    "CI",
    "CI_API_V4_URL",
    "CI_API_GRAPHQL_URL",
    "CI_COMMIT_AUTHOR",
    "CI_COMMIT_BEFORE_SHA",
    "CI_COMMIT_BRANCH",
    "CI_COMMIT_DESCRIPTION",
    "CI_COMMIT_MESSAGE",
    "CI_COMMIT_REF_NAME",
    "CI_COMMIT_REF_PROTECTED",
    "CI_COMMIT_REF_SLUG",
    "CI_COMMIT_SHA",
    "CI_COMMIT_SHORT_SHA",
    "CI_COMMIT_TIMESTAMP",
    "CI_COMMIT_TITLE",
    "CI_CONFIG_PATH",
    "CI_DEBUG_TRACE",
    "CI_DEBUG_SERVICES",
    "CI_DEFAULT_BRANCH",
    "CI_DEPENDENCY_PROXY_DIRECT_GROUP_IMAGE_PREFIX",
    "CI_DEPENDENCY_PROXY_GROUP_IMAGE_PREFIX",
    "CI_DEPENDENCY_PROXY_PASSWORD",
    "CI_DEPENDENCY_PROXY_SERVER",
    "CI_DEPENDENCY_PROXY_USER",
    "CI_DEPLOY_FREEZE",
    "CI_DISPOSABLE_ENVIRONMENT",
    "CI_ENVIRONMENT_NAME",
    "CI_ENVIRONMENT_SLUG",
    "CI_ENVIRONMENT_URL",
    "CI_ENVIRONMENT_ACTION",
    "CI_ENVIRONMENT_TIER",
    "CI_GITLAB_FIPS_MODE",
    "CI_HAS_OPEN_REQUIREMENTS",
    "CI_JOB_GROUP_NAME",
    "CI_JOB_IMAGE",
    "CI_JOB_MANUAL",
    "CI_JOB_NAME_SLUG",
    "CI_JOB_STAGE",
    "CI_JOB_STARTED_AT",
    "CI_JOB_URL",
    "CI_KUBERNETES_ACTIVE",
    "CI_NODE_INDEX",
    "CI_NODE_TOTAL",
    "CI_OPEN_MERGE_REQUESTS",
    "CI_PAGES_DOMAIN",
    "CI_PAGES_URL",
    "CI_PIPELINE_IID",
    "CI_PIPELINE_SOURCE",
    "CI_PIPELINE_TRIGGERED",
    "CI_PIPELINE_URL",
    "CI_PIPELINE_CREATED_AT",
    "CI_PIPELINE_NAME",
    "CI_PROJECT_CLASSIFICATION_LABEL",
    "CI_PROJECT_DESCRIPTION",
    "CI_PROJECT_NAMESPACE",
    "CI_PROJECT_NAMESPACE_ID",
    "CI_PROJECT_NAMESPACE_SLUG",
    "CI_PROJECT_PATH_SLUG",
    "CI_PROJECT_REPOSITORY_LANGUAGES",
    "CI_PROJECT_ROOT_NAMESPACE",
    "CI_PROJECT_TITLE",
    "CI_PROJECT_URL",
    "CI_PROJECT_VISIBILITY",
    "CI_REGISTRY",
    "CI_REGISTRY_IMAGE",
    "CI_REGISTRY_PASSWORD",
    "CI_REGISTRY_USER",
    "CI_REPOSITORY_URL",
    "CI_RUNNER_DESCRIPTION",
    "CI_RUNNER_EXECUTABLE_ARCH",
    "CI_RUNNER_REVISION",
    "CI_RUNNER_TAGS",
    "CI_RUNNER_VERSION",
    "CI_SERVER_FQDN",
    "CI_SERVER_HOST",
    "CI_SERVER_NAME",
    "CI_SERVER_PORT",
    "CI_SERVER_PROTOCOL",
    "CI_SERVER_SHELL_SSH_HOST",
    "CI_SERVER_SHELL_SSH_PORT",
    "CI_SERVER_REVISION",
    "CI_SERVER_URL",
    "CI_SERVER_VERSION",
    "CI_SERVER_VERSION_MAJOR",
    "CI_SERVER_VERSION_MINOR",
    "CI_SERVER_VERSION_PATCH",
    "CI_TEMPLATE_REGISTRY_HOST",
    "CI_TRIGGER_SHORT_TOKEN",
    "GITLAB_CI",
    "GITLAB_FEATURES",
    "GITLAB_USER_EMAIL",
    "GITLAB_USER_ID",
    "GITLAB_USER_LOGIN",
    "GITLAB_USER_NAME",
    "KUBECONFIG",
    "TRIGGER_PAYLOAD",
];
