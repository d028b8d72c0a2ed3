//! Placing a run's layers where measurement says: an `auto` placement refined by each
//! layer's cost timed on the device it will use (and, on a CPU, a split taken only if a
//! trial run shows it faster), and `auto` over workers, each host timing the layers on its
//! own device. The timing is the pipeline's ([`layerwise_pipeline::calibrate`]), the
//! balancing the plan's ([`layerwise_plan::balance`]); this is where the two meet.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use layerwise_pipeline::calibrate;
use layerwise_plan::balance::balance_over;
use layerwise_plan::placement::{self, one_layer_each, over_devices, share_threads, Ask, Processes};
use layerwise_plan::{DeviceId, Host, Placement, Plan, StagePlan};

use crate::{Error, Result};

/// The least time `auto`'s trial of a CPU split times each way (see [`try_split`]).
const TRIAL_WINDOW: Duration = Duration::from_secs(1);

/// Re-splits an `auto` placement of this process by each layer's cost measured on the
/// device it will run on. Other placements are left as they are.
pub fn by_measurement(plan: &mut Plan) -> Result<()> {
    if plan.config.pipeline.workers.is_empty()
        && placement::wants_measurement(&plan.config, plan.stages.len(), &plan.machine)
    {
        let costs = calibrate::costs(plan)?;
        let stages = placement::resolve(&plan.config, plan.num_layers(), &plan.machine, Some(&costs))?;
        plan.stages = if costs.one_thread.is_some() && stages.len() > 1 { try_split(plan, stages)? } else { stages };
    }
    Ok(())
}

/// The CPU split `auto` chose, if it measures at least 5% faster than one stage with every
/// thread, else one stage: the split's model (see `balance::cpu_split`) only predicts how
/// its one-thread stages share the cores. Both are run the same way (a pipeline of threads
/// and channels, see `calibrate::split_step_time`), alternating, twice where that is quick;
/// the margin covers what the trial leaves out (the loader, reports, statistics).
fn try_split(plan: &Plan, split: Vec<StagePlan>) -> Result<Vec<StagePlan>> {
    let sizes: Vec<usize> = split.iter().map(|s| s.layers.len()).collect();
    let threads = plan.config.train.thread_budget(plan.machine.cores);
    let one = [plan.num_layers()];
    let started = Instant::now();
    let mut one_stage = calibrate::split_step_time(plan, &one, threads, TRIAL_WINDOW)?;
    let mut measured = calibrate::split_step_time(plan, &sizes, 1, TRIAL_WINDOW)?;
    // Once more each, alternating, the faster kept, where that costs seconds, not minutes.
    if started.elapsed() < Duration::from_secs(10) {
        one_stage = one_stage.min(calibrate::split_step_time(plan, &one, threads, TRIAL_WINDOW)?);
        measured = measured.min(calibrate::split_step_time(plan, &sizes, 1, TRIAL_WINDOW)?);
    }
    split_or_one_stage(plan, split, measured, one_stage)
}

/// `split` if its measured step (`measured` seconds) is at least 5% under one stage's, else
/// one stage with every thread.
fn split_or_one_stage(plan: &Plan, split: Vec<StagePlan>, measured: f64, one_stage: f64) -> Result<Vec<StagePlan>> {
    let take = measured <= 0.95 * one_stage;
    tracing::info!(
        "auto: stages of {:?} layers measured {:.1} ms a step, one stage {:.1} ms: {}",
        split.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
        measured * 1e3,
        one_stage * 1e3,
        if take { "split" } else { "keeping one stage" }
    );
    if take {
        return Ok(split);
    }
    let mut single = plan.config.clone();
    single.pipeline.placement = Placement::Single;
    Ok(placement::resolve(&single, plan.num_layers(), &plan.machine, None)?)
}

/// Places an `auto` placement with `pipeline.workers` once they have registered
/// (`workers`: each one's name and devices, in the config's order; `processes`: the machine
/// and cores of each, this process's included): one stage per device, this process's
/// first; where any of those devices is a GPU, only the GPUs get stages (this process may
/// then only load and feed). The layers are split by their step times measured on each
/// host that gets a stage, once per host (its devices being taken to be alike), with the
/// threads its stage will have: here, and on the workers through `measure_on` (see
/// [`layerwise_net::Cluster::ask_layer_times`]), all at once. A slower host gets fewer layers.
pub fn over_workers(
    plan: &mut Plan,
    workers: &[(String, Vec<DeviceId>)],
    processes: &Processes,
    measure_on: impl FnOnce(&[Ask]) -> Result<Vec<Vec<f64>>> + Send,
) -> Result<()> {
    let devices = devices_for_stages(plan, workers);
    let parts = devices.len().min(plan.num_layers());
    let sizes = if parts > 1 {
        balance_over(&measured_costs(plan, &devices[..parts], processes, measure_on)?)
    } else {
        vec![plan.num_layers()]
    };
    let mut placed = plan.config.clone();
    placed.pipeline.workers.clear();
    plan.stages = over_devices(&placed, &plan.machine, &devices, &sizes)?;
    let idle: Vec<&str> = workers.iter().map(|(n, _)| n.as_str()).filter(|n| !plan.workers().contains(*n)).collect();
    if !idle.is_empty() {
        let (layers, devices) = (plan.num_layers(), devices.len());
        tracing::warn!("workers {idle:?} get no stage: the model has {layers} layers for {devices} devices");
    }
    Ok(())
}

/// Every device a stage may go to, this process's first; only the GPUs where there are any
/// (the CPUs then only feed them).
fn devices_for_stages(plan: &Plan, workers: &[(String, Vec<DeviceId>)]) -> Vec<(Host, DeviceId)> {
    let mut devices: Vec<(Host, DeviceId)> =
        plan.machine.visible().into_iter().map(|d| (Host::Coordinator, d)).collect();
    for (name, offered) in workers {
        devices.extend(offered.iter().map(|d| (Host::Worker(name.clone()), *d)));
    }
    if devices.iter().any(|(_, d)| d.is_cuda()) {
        devices.retain(|(_, d)| d.is_cuda());
    }
    devices
}

/// Each layer's step time on each of `devices` (one stage each): measured once per host,
/// with the threads its stage will have (its machine's budget shared among the CPU stages
/// there), here and on the workers at once.
fn measured_costs(
    plan: &Plan,
    devices: &[(Host, DeviceId)],
    processes: &Processes,
    measure_on: impl FnOnce(&[Ask]) -> Result<Vec<Vec<f64>>> + Send,
) -> Result<Vec<Vec<f64>>> {
    let mut provisional = one_layer_each(devices);
    share_threads(&mut provisional, &plan.config, processes);
    let mut hosts: Vec<(Host, DeviceId, usize)> = Vec::new();
    for (stage, (host, device)) in provisional.iter().zip(devices) {
        if !hosts.iter().any(|h| h.0 == *host) {
            hosts.push((host.clone(), *device, stage.threads));
        }
    }
    let asks: Vec<Ask> = hosts
        .iter()
        .filter_map(|(host, device, threads)| {
            host.worker().map(|name| Ask { name: name.to_string(), device: *device, threads: *threads })
        })
        .collect();
    let local = hosts.iter().find(|h| h.0 == Host::Coordinator).map(|&(_, device, threads)| (device, threads));
    let (local, remote) = std::thread::scope(|s| {
        let remote = s.spawn(|| if asks.is_empty() { Ok(Vec::new()) } else { measure_on(&asks) });
        let local = local.map(|(device, threads)| calibrate::layer_times(plan, device, threads)).transpose();
        (local, remote.join())
    });
    let remote = remote.map_err(|_| Error::Other("asking the workers to measure panicked".into()))?;
    let mut times = local?.into_iter().chain(remote?);
    let mut by_host: BTreeMap<Host, Vec<f64>> = BTreeMap::new();
    // `hosts` has this process first, as `devices` has, then the workers as asked.
    for (host, device, threads) in hosts {
        let times = times.next().unwrap_or_default();
        if times.len() != plan.num_layers() || times.iter().any(|t| !t.is_finite() || *t < 0.0) {
            return Err(Error::Other(format!(
                "{}: measured {} step times for {} layers ({times:?}); expected one finite time a layer",
                if host == Host::Coordinator { "this process".to_string() } else { host.to_string() },
                times.len(),
                plan.num_layers()
            )));
        }
        let ms = times.iter().sum::<f64>() * 1e3;
        let name = host.worker().unwrap_or("this process");
        tracing::info!(
            "auto: {name} on {device} with {threads} thread(s): {ms:.2} ms a step for all {} layers",
            times.len()
        );
        by_host.insert(host, times);
    }
    Ok(devices.iter().map(|(host, _)| by_host[host].clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use layerwise_plan::{Machine, RunConfig};
    use std::collections::BTreeSet;

    /// This process on a machine of 2 cores and each of `workers` on a machine of its own,
    /// but for those named in `beside`, which share this one's.
    fn processes(workers: &[(String, Vec<DeviceId>)], beside: &[&str]) -> Processes {
        let mut all = placement::this_process(2);
        let here = all[&Host::Coordinator].1.clone();
        for (name, _) in workers {
            let machine = if beside.contains(&name.as_str()) { here.clone() } else { format!("{name}'s") };
            all.insert(Host::Worker(name.clone()), (2, machine));
        }
        all
    }

    fn ask(name: &str, device: DeviceId, threads: usize) -> Ask {
        Ask { name: name.into(), device, threads }
    }

    /// Each stage's host (a worker's name, none for this process), device and layer count.
    fn placed(plan: &Plan) -> Vec<(Option<&str>, DeviceId, usize)> {
        plan.stages.iter().map(|s| (s.host.worker(), s.device(), s.layers.len())).collect()
    }

    #[test]
    fn auto_over_workers_gives_each_device_a_stage_this_process_first() {
        let mut c = RunConfig::default();
        c.model.num_layers = 3; // four layers with the output layer
        c.model.num_hidden = 64;
        c.pipeline.workers = vec!["w1".into(), "w2".into()];
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        // Layer costs are measured here (a tiny default net) and asked of the workers, all
        // at once: here each says 10 ms a layer, slower than this process, and every stage
        // still gets a layer. Each is asked with its stage's threads: w1 shares this
        // machine's two cores with this process's stage, w2 has its own two.
        let cpus = [("w1".to_string(), vec![DeviceId::Cpu]), ("w2".into(), vec![DeviceId::Cpu])];
        let mut asked = Vec::new();
        over_workers(&mut plan, &cpus, &processes(&cpus, &["w1"]), |asks| {
            asked = asks.to_vec();
            Ok(vec![vec![1e-2; 4]; asks.len()])
        })
        .unwrap();
        assert_eq!(asked, vec![ask("w1", DeviceId::Cpu, 1), ask("w2", DeviceId::Cpu, 2)]);
        assert_eq!(
            placed(&plan),
            vec![(None, DeviceId::Cpu, 2), (Some("w1"), DeviceId::Cpu, 1), (Some("w2"), DeviceId::Cpu, 1)]
        );
        assert_eq!(plan.stages[0].threads, 2, "placed, this process's stage has its cores till they are shared");
        // GPUs among the devices: the CPUs get no stage, this process's included; each host
        // is asked once.
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let gpus =
            [("w1".to_string(), vec![DeviceId::Cuda(0)]), ("w2".into(), vec![DeviceId::Cuda(0), DeviceId::Cuda(1)])];
        let mut asked = Vec::new();
        over_workers(&mut plan, &gpus, &processes(&gpus, &[]), |asks| {
            asked = asks.to_vec();
            Ok(vec![vec![1.0; 4], vec![2.0; 4]])
        })
        .unwrap();
        assert_eq!(asked, vec![ask("w1", DeviceId::Cuda(0), 1), ask("w2", DeviceId::Cuda(0), 1)]);
        assert_eq!(
            placed(&plan),
            vec![
                (Some("w1"), DeviceId::Cuda(0), 2),
                (Some("w2"), DeviceId::Cuda(0), 1),
                (Some("w2"), DeviceId::Cuda(1), 1)
            ]
        );
        // More devices than layers: the last workers get nothing and are not asked.
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let five: Vec<(String, Vec<DeviceId>)> = (1..=5).map(|i| (format!("w{i}"), vec![DeviceId::Cpu])).collect();
        let mut asked = Vec::new();
        over_workers(&mut plan, &five, &processes(&five, &[]), |asks| {
            asked = asks.iter().map(|a| a.name.clone()).collect();
            Ok(vec![vec![1e-3; 4]; asks.len()])
        })
        .unwrap();
        assert_eq!(asked, vec!["w1", "w2", "w3"]);
        assert_eq!(plan.stages.len(), 4);
        assert_eq!(plan.workers(), BTreeSet::from(["w1".to_string(), "w2".into(), "w3".into()]));
        // A worker's answer that does not fit the net is an error naming it.
        let one = &five[..1];
        let mut plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let e = over_workers(&mut plan, one, &processes(one, &[]), |_| Ok(vec![vec![1.0; 3]])).unwrap_err().to_string();
        assert!(e.contains("worker w1") && e.contains("3 step times for 4 layers"), "{e}");
        let e = over_workers(&mut plan, one, &processes(one, &[]), |_| Ok(vec![vec![f64::NAN; 4]]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker w1") && e.contains("finite"), "{e}");
        // So is a worker's failure to measure.
        let e = over_workers(&mut plan, one, &processes(one, &[]), |_| Err(Error::Other("worker w1 is lost".into())))
            .unwrap_err()
            .to_string();
        assert!(e.contains("worker w1 is lost"), "{e}");
    }

    #[test]
    fn auto_takes_a_cpu_split_only_when_it_measures_faster_than_one_stage() {
        let mut c = RunConfig::default();
        c.model.num_layers = 2;
        c.model.num_hidden = 64;
        c.train.batch_size = 16;
        let plan = Plan::build(&c, Machine { cuda_devices: 0, cores: 2 }).unwrap();
        let mut per_layer = c.clone();
        per_layer.pipeline.placement = Placement::PerLayer;
        let split = placement::resolve(&per_layer, 3, &plan.machine, None).unwrap();
        let kept = split_or_one_stage(&plan, split.clone(), 0.97, 1.0).unwrap();
        assert_eq!(kept.len(), 1, "3% faster is not enough: {kept:?}");
        assert_eq!((kept[0].layers.clone(), kept[0].threads), (vec![0, 1, 2], 2));
        assert_eq!(split_or_one_stage(&plan, split.clone(), 0.9, 1.0).unwrap(), split, "10% faster is taken");
        // The whole trial gives one of the two.
        let chosen = try_split(&plan, split.clone()).unwrap();
        assert!(chosen == split || chosen == kept, "{chosen:?}");
    }
}
